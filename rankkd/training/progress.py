"""Progress of an epoch: tqdm's bar on a terminal when tqdm is installed, else one printed line per update (a log
file reads better that way); only on rank 0."""
import importlib.util
import sys
import time

def format_duration(seconds):
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress through `total` steps: `update(done, text)` shows the text (loss, img/s) and the time left."""

    def __init__(self, total, description, enabled=True):
        self.total, self.description, self.enabled = total, description, enabled
        self.start = time.perf_counter()
        self.bar = None
        # A bar redraws with carriage returns: in a log file (a grid cell's train.log, a cluster job) plain lines read
        # better.
        if enabled and sys.stdout.isatty() and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, dynamic_ncols=True, leave=False, file=sys.stdout)

    def update(self, done, text):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done) if done else 0.0
        print(f"{self.description} [{done:>{len(str(self.total))}}/{self.total}] {text}  "
              f"ETA {format_duration(left)}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
