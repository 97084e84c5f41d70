"""Training feedback: a progress bar in a terminal or in Jupyter, one line per epoch elsewhere
(a piped log shows every epoch as it ends, not everything at the end)."""

from __future__ import annotations

import sys


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where stderr is not a terminal, yet a bar is wanted)."""
    shell = sys.modules.get("IPython")
    shell = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell" or "google.colab" in sys.modules


class Progress:
    """``progress=True`` (a bar), ``False`` (silent) or ``None`` (auto: a bar in a terminal or a
    notebook, one line per epoch otherwise)."""

    def __init__(self, progress: bool | None = None):
        if progress is None:
            mode = "bar" if in_notebook() or sys.stderr.isatty() else "lines"
        else:
            mode = "bar" if progress else "off"
        self.mode = mode
        self._tqdm = _tqdm_class() if mode == "bar" else None

    def bar(self, total: int, initial: int, desc: str):
        if self._tqdm is None:
            return _NoBar()
        return self._tqdm(total=total, initial=initial, desc=desc, leave=False)

    def epoch_done(self, record: dict) -> None:
        line = " ".join(f"{k}={v}" for k, v in record.items())
        if self._tqdm is not None:
            self._tqdm.write(line)
        elif self.mode == "lines":
            print(line, file=sys.stderr, flush=True)


def _tqdm_class():
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401  (tqdm's notebook bar needs it)
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    from tqdm.std import tqdm

    return tqdm


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass
