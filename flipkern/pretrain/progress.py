"""Progress on stderr: the tqdm bar when stderr is a terminal; otherwise one line
every --log-every steps (as open_clip_train logs), so ``flipkern-pretrain > log``,
nohup or a job scheduler show the run advancing instead of nothing until the end."""
import datetime
import sys

from .errors import PROG


def progress_mode(enabled, is_main, stderr_is_tty):
    """'bar', 'lines' or None (--no-progress, or a rank other than 0)."""
    if not (enabled and is_main):
        return None
    return "bar" if stderr_is_tty else "lines"


def progress_line(step, total, loss, lr, img_per_s, eta_s):
    eta = datetime.timedelta(seconds=round(eta_s))
    return (f"{PROG}: step {step}/{total} ({100 * step / total:.0f}%) loss {loss:.4f} lr {lr:.3e} "
            f"img/s {img_per_s:.1f} eta {eta}")


class Progress:
    """``update`` after every optimizer step; ``log`` on the steps that are logged."""

    def __init__(self, mode, total, initial):
        from tqdm import tqdm
        self.mode, self.total = mode, total
        self.bar = tqdm(total=total, initial=initial, disable=mode != "bar", dynamic_ncols=True, desc=PROG)

    def update(self, step, loss, lr, img_per_s):
        self.bar.update(1)
        if self.mode == "bar":
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", ips=f"{img_per_s:.0f}", refresh=False)

    def log(self, step, loss, lr, img_per_s, eta_s):
        if self.mode == "lines":
            print(progress_line(step, self.total, loss, lr, img_per_s, eta_s), file=sys.stderr, flush=True)

    def write(self, message):
        """A message on stdout that does not break the bar."""
        self.bar.write(message)

    def close(self):
        self.bar.close()
