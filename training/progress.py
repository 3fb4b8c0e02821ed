"""A one-line progress display with rate and ETA (a log line when not a TTY)."""

import sys
import time


def _format_duration(seconds):
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class Progress:
    """Shows `epoch e/E  step s/S  [bar]  metrics  img/s  ETA epoch / total`."""

    def __init__(self, total_steps, steps_per_epoch, stream=None, log_every=25, enabled=True):
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.stream = stream or sys.stdout
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self.log_every = log_every
        self.enabled = enabled
        self._start_time = None
        self._start_step = 0

    def start(self, step):
        self._start_time = time.perf_counter()
        self._start_step = step

    def rate(self, step):
        elapsed = time.perf_counter() - self._start_time
        done = step - self._start_step
        return done / elapsed if elapsed > 0 and done > 0 else 0.0

    def update(self, step, epoch, step_in_epoch, metrics, images_per_second, force=False):
        if not self.enabled:
            return
        if not (self.interactive or force or step % self.log_every == 0):
            return
        steps_per_second = self.rate(step)
        eta_epoch = (self.steps_per_epoch - step_in_epoch) / steps_per_second if steps_per_second else 0
        eta_total = (self.total_steps - step) / steps_per_second if steps_per_second else 0
        width = 20
        filled = int(width * step_in_epoch / max(self.steps_per_epoch, 1))
        bar = "=" * filled + (">" if filled < width else "") + "." * max(width - filled - 1, 0)
        values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = (
            f"epoch {epoch + 1}  step {step_in_epoch}/{self.steps_per_epoch} [{bar}]  "
            f"{values}  {images_per_second:.1f} img/s  "
            f"ETA {_format_duration(eta_epoch)} (run {_format_duration(eta_total)})"
        )
        if self.interactive and not force:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(("\r" if self.interactive else "") + line + "\n")
        self.stream.flush()

    def message(self, text):
        if self.enabled:
            self.stream.write(("\n" if self.interactive else "") + text + "\n")
            self.stream.flush()
