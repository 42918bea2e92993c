"""Run by the memory tests in a fresh process (the test process's own memory is polluted by the tests
before it): one step of the repo's work, measured from after the imports, printing what it used.

  memory_worker.py prefill CHECKPOINT IDX LOGITS   a prompt (torch.save'd ids) through the model; saves the
                                                   logits; prints the peak resident KiB before and after
  memory_worker.py convert FOLDER                  the converter on a hub-layout folder; prints the growth of
                                                   the peak resident size, in bytes
  memory_worker.py quantize CHECKPOINT MODE...     quantize.py's work in each mode, twice (the first pays the
                                                   one-time allocations); prints the growth of the anonymous
                                                   memory during the second, in KiB, a line per mode
  memory_worker.py export CHECKPOINT OUTPUT         scripts/export_gguf.py's work, twice in the same way (the
                                                   second measured): prints the growth of the anonymous memory,
                                                   in KiB"""
import resource
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def anon_kib() -> int:
    """The process's anonymous (non-file) resident memory: reading the mmapped source and filling the
    mmapped output use page cache, which does not count here."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])


def prefill(checkpoint: str, idx_path: str, logits_path: str):
    from checkpoint import load_model, open_checkpoint
    idx = torch.load(idx_path)
    model = load_model(open_checkpoint(checkpoint), "cpu", torch.float32)
    model.setup_caches(1, idx.size(1))
    before = peak_kib()
    with torch.no_grad():
        logits = model(idx, torch.arange(idx.size(1)))
    torch.save(logits, logits_path)
    print(before, peak_kib())


def convert(folder: str):
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    before = peak_kib()
    convert_hf_checkpoint(folder)
    print((peak_kib() - before) * 1024)


def quantize(checkpoint: str, *modes: str):
    from quantize import quantize_checkpoint
    for mode in modes:
        quantize_checkpoint(checkpoint, mode)  # once first, so that the measured run finds its imports warm
        print(anonymous_growth_kib(lambda: quantize_checkpoint(checkpoint, mode)), flush=True)


def export(checkpoint: str, output: str):
    from scripts.export_gguf import export_gguf
    export_gguf(checkpoint, output)  # once first, so that the measured run finds its imports warm
    print(anonymous_growth_kib(lambda: export_gguf(checkpoint, output)), flush=True)


def anonymous_growth_kib(run) -> int:
    """How far anonymous memory rose above its level at the start while run() ran, sampled every ms."""
    peak, done = [anon_kib()], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(anon_kib())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    done.set()
    sampler.join()
    return max(peak) - peak[0]


if __name__ == "__main__":
    {"prefill": prefill, "convert": convert, "quantize": quantize, "export": export}[sys.argv[1]](*sys.argv[2:])
