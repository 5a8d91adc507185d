"""Small helpers every part of the project shares: repo paths, dtypes, atomic writes, CLI errors, quiet loading.

Standard library only at import time (torch is imported where it is used): scripts.demo parses its flags with
this module before it has installed the requirements.

One home for each: nothing here knows about the model, the data or training.
"""
import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
# Default places, all under the repo root (flags override them; nothing resolves from the current directory).
DEFAULT_SAVE_DIR = REPO_ROOT / "out"
DEFAULT_CHECKPOINT_DIR = REPO_ROOT / "checkpoints"
DEFAULT_TOKENIZER_PATH = REPO_ROOT / "model"
DEFAULT_DATA_DIR = REPO_ROOT / "dataset"
DEFAULT_TRANSFORMERS_DIR = REPO_ROOT / "MiniMind2-V"

# numpy seeds are 32-bit; TCP ports 16-bit (flag ranges).
MAX_SEED = 2 ** 32 - 1
MAX_PORT = 2 ** 16 - 1

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # --dtype choices; torch_dtype(name) gives the torch dtype


class UserError(ValueError):
    """Bad input from the user (a file, a flag, a request): reported in one line, never as a traceback."""


class RunStopped(Exception):
    """A run ended early on purpose (a signal, too many bad steps); the message says how to go on."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class SaveError(OSError):
    """A file could not be written (disk full, no permission); the previous file is kept."""


def run_cli(main, argv=None):
    """Run an entry point's `main(argv)`: a user mistake ends in one line on stderr (exit 2), not a traceback.

    UserError, SaveError and FileNotFoundError describe bad input or a full disk; anything else is a bug and
    keeps its traceback.
    """
    try:
        result = main(argv)
    except RunStopped as stop:
        print(str(stop), file=sys.stderr)
        sys.exit(stop.exit_code)
    except (UserError, FileNotFoundError, SaveError) as error:
        first, _, rest = str(error).partition("\n")
        print(f"error: {first}" + (f"\n{rest}" if rest else ""), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if isinstance(result, int):
        sys.exit(result)


def atomic_write(path, write) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, fsync, then rename over `path`.

    A crash or error leaves the previous file intact and no temporary file behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # fixed name: the next save replaces what a killed one left
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is missing or unwritable: there is no temporary file to remove
            pass
        raise SaveError(f"could not write {path} ({error}); the previous file is kept") from error
    return path


def atomic_save(obj, path) -> Path:
    """torch.save through `atomic_write`."""
    import torch

    return atomic_write(path, lambda handle: torch.save(obj, handle))


def torch_dtype(name: str):
    """torch.bfloat16 for "bfloat16", etc. (one of DTYPE_NAMES)."""
    import torch

    return getattr(torch, name)


def default_device() -> str:
    """--device's default: the first CUDA GPU when torch sees one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_flag(value: str) -> str:
    """argparse type of every --device: a device this machine has (cpu, cuda, cuda:N, mps), else a usage error
    that says what is here (torch would otherwise fail at the first tensor it moves, deep in a traceback)."""
    try:
        import torch
    except ImportError:  # scripts.demo --install parses its flags before it installs torch
        return value
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{value}: torch {torch.__version__} sees no CUDA GPU on this machine (a CPU build of torch, or no "
                f"driver); use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{value}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: this machine has no MPS (Apple GPU) device; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{value}: give cpu, cuda, cuda:N or mps")
    return value


def unwrap(model):
    """The model inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def count_parameters(model) -> tuple:
    """(all, trainable) parameter counts, the tied embedding counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@contextmanager
def quiet_transformers():
    """No progress bars or load reports from transformers while loading (CLIP's text tower is unused by design)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def bounded(kind, low=None, high=None, low_open=False):
    """An argparse `type=` that parses `kind` (int or float) and refuses values outside [low, high].

    `low_open=True` makes the lower bound exclusive (a rate that must be > 0). The error is argparse's usual
    one line: `argument --batch_size: must be an integer >= 1, got 0`.
    """
    noun = "an integer" if kind is int else "a number"
    limits = []
    if low is not None:
        limits.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        limits.append(f"<= {high}")
    wanted = f"{noun} {' and '.join(limits)}".strip()

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    parse.kind, parse.low, parse.high, parse.low_open = kind, low, high, low_open  # for tests and --help tools
    return parse
