"""How much memory a run needs, and what train.py says when it runs out.

A run whose lower bound of memory exceeds the machine's is refused before anything is allocated
(check_memory): the bound counts only what every model of its kind must hold (memory_needed), so
that nothing that fits is refused. Running out later, on the CPU or a GPU (out_of_memory
recognises either), ends in one line that names the sizes the run asked for, as they were typed
(does_not_fit).
"""
import contextlib
import ctypes
import os

import autodiff as ad
import datasets
from cli.kinds import kind_of, model_of
from cli.options import UserError, flags

# ---------------------------------------------------------------------------------------------
# A lower bound, from the options alone: a run that clearly cannot fit is refused
# ---------------------------------------------------------------------------------------------

def trained_networks(config):
    """How many networks, each with every hidden layer, every model of its kind trains at least.
    Semi-supervised: q(y|a,x), q(z|a,y,x) and p(x|a,y,z) (all M2 has; the authors' q(a|x) is
    frozen); the avae: q(a|x), q(z|a,x), p(a|z) and p(x|z) or p(z|z) per stochastic layer; the
    potential: q(z|a) and p(a|z), and none for gauss."""
    return {"semi-supervised": 3, "avae": 4 * config["layers"],
            "potential": 2 if config["model"] == "avae" else 0}[model_of(config).kind]


def fewest_parameters(config):
    """A lower bound of a model's trained parameters, from its options alone: the weight matrices
    between consecutive hidden layers of its trained_networks. The first and last layers, the
    biases and every other network only add to it."""
    hidden = config["hidden"]
    return trained_networks(config) * sum(a * b for a, b in zip(hidden, hidden[1:]))


def memory_needed(config, device):
    """Lower bounds of the bytes a training run holds in the machine's memory at once, from its
    options alone: (weights, activations). On the CPU: the weights, their gradients and Adam's two
    moments (4 float32 copies, Adam's flat buffers), and p(x|·)'s hidden layers over one step's
    batch × samples × classes rows, kept for the backward pass. On a GPU both live on the device,
    and the host still holds three of the weights' copies whenever it writes a checkpoint."""
    weights = 4 * fewest_parameters(config) * (4 if device == "cpu" else 3)
    if device != "cpu" or not trained_networks(config):
        return weights, 0
    classes = datasets.N_CLASSES.get(config["dataset"], 1) if kind_of(config).labeled else 1
    samples = 1 if config["dataset"] == "potential" else config["samples"]  # a potential's batch is its samples
    return weights, 4 * config["batch_size"] * samples * classes * sum(config["hidden"])


def machine_memory():
    """The machine's physical memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config):
    """Refuse a run whose lower bound of memory (memory_needed) exceeds the machine's: it could
    only end in an out-of-memory error, or in the system killing a process."""
    have = machine_memory()
    weights, activations = memory_needed(config, ad.device_name())
    if have and weights + activations > have:
        what = ("the model does" if weights > have else "the batch does" if activations > have
                else "the model and its batch do")
        parts = []
        if weights:
            parts.append(f"{in_bytes(weights)} for the weights with Adam's state")
        if activations:
            parts.append(f"{in_bytes(activations)} for one step's activations")
        raise UserError(f"{what} not fit in memory: {asked_sizes(config)} need at least "
                        f"{in_bytes(weights + activations)} ({', '.join(parts)}), and this machine has {in_bytes(have)}")


# ---------------------------------------------------------------------------------------------
# Out of memory: the sizes asked for, in one line
# ---------------------------------------------------------------------------------------------

def out_of_memory(error):
    """Whether `error` says that the host or the device ran out of memory: NumPy's MemoryError,
    CuPy's cupy.cuda.memory.OutOfMemoryError (also a MemoryError), or an error of CuPy's CUDA
    bindings that says so (cudaErrorMemoryAllocation, CUBLAS_STATUS_ALLOC_FAILED, ...). CuPy's
    are told by their module's name, so that cupy need not be imported to recognise them."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or (type(error).__module__.startswith("cupy")
                                              and ("out of memory" in text or "alloc" in text))


@contextlib.contextmanager
def on_out_of_memory(message):
    """Running out of memory inside the block raises UserError(message) instead: one line."""
    try:
        yield
    except Exception as e:
        if not out_of_memory(e):
            raise
        raise UserError(message) from None


def asked_sizes(config, evaluating=False):
    """The sizes a run asks for, as typed: '--hidden 500 500, --latent 100 100, --batch-size 100
    and --samples 1', and the evaluation's samples where they are more than one."""
    keys = ["hidden", "latent"] if evaluating else ["hidden", "latent", "batch_size", "samples"]
    if evaluating or config["eval_samples"] > 1:
        keys.append("eval_samples")
    if config["iw_samples"]:
        keys.append("iw_samples")
    typed = [f"{flags([k])} {' '.join(map(str, config[k])) if isinstance(config[k], list) else config[k]}"
             for k in keys]
    return ", ".join(typed[:-1]) + " and " + typed[-1]


def does_not_fit(config, evaluating=False):
    return f"the model or the batch does not fit ({asked_sizes(config, evaluating)})"


def in_bytes(n):
    """A size for people, in powers of 1000: '4.3 TB', '480 MB'."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            break
        n /= 1000
    return f"{n:.1f} {unit}" if n < 10 and unit != "bytes" else f"{n:.0f} {unit}"


# ---------------------------------------------------------------------------------------------
# The CPU's allocator
# ---------------------------------------------------------------------------------------------

def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse: a step allocates ~100 MB of short-lived arrays,
    each large one otherwise mapped afresh and page-faulted in (~8000 faults a step here).
    Harmless where it does not apply (no glibc, or a GPU, whose memory CuPy pools itself)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap
        libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: serve blocks below 32 MB from the heap
    except (OSError, AttributeError):
        pass
