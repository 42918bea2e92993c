# The transformers comparison of `scripts/benchmark.py --checkpoint_path <hub-layout folder>/model.pth
# --compare-hf`: the same checkpoint through transformers' MixtralForCausalLM, eager, in the benchmark's
# process, measured as this repo is, its rows added to the benchmark's table.
import gc
import inspect
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from measuring import Timer, seconds
from scripts.bench_common import Bench, Decode, Row, decode_rounds


@torch.no_grad()
def compare_hf(args, precision: torch.dtype, bench: Bench, weight_bytes: int, ours: dict) -> list:
    """The rows of transformers' prefill (args.prefill_lengths) and decode (args.decode_prompts).

    Its prefill rounds alternate with ours (ours[length](idx)) on the same prompt, so that both see the
    same machine: a shared machine's load comes and goes by the minute. The ratio printed is the median
    of the per-round ratios; ours' own row (and its peak memory) comes from the run before, without
    transformers loaded. transformers' peak memory includes our model, so it is not reported."""
    from transformers import MixtralForCausalLM
    device = bench.device
    folder = Path(args.checkpoint_path).parent
    model = MixtralForCausalLM.from_pretrained(folder, dtype=precision).to(device).eval()
    bench = replace(bench, vocab=model.config.vocab_size)
    impl = (f"transformers {transformers_version()} (attention {model.config._attn_implementation}, "
            f"experts {getattr(model.config, '_experts_implementation', None) or 'eager'})")
    # Newer transformers name the KV cache (argument and output) cache, older ones past_key_values.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    for length in args.prefill_lengths:
        row = Row(impl, "prefill", str(length))
        idx = torch.randint(0, bench.vocab, (1, length), generator=bench.generator).to(device)
        hf_prefill = lambda: model(idx, use_cache=False).logits[:, -1]  # noqa: E731
        times = {"ours": [], "hf": []}
        for r in range(args.runs + 1):  # round 0 warms both up
            for who, fn in (("ours", lambda: ours[length](idx)), ("hf", hf_prefill)):
                t = seconds(fn, device)
                if r:
                    times[who].append(t)
        row.tokens_per_s = [length / t for t in times["hf"]]
        row.speedups = [h / o for o, h in zip(times["ours"], times["hf"])]
        rows.append(row)
        print(f"transformers prefill {length}: {row.median_tps:.1f} tokens/s; this repo in the same rounds: "
              f"{statistics.median(length / t for t in times['ours']):.1f} tokens/s", flush=True)
    del ours
    gc.collect()

    def hf_decode_seconds(prompts):  # greedy, with its own (dynamic) KV cache; batch 1
        out = model(prompts[0][None].long(), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        with Timer(device) as timer:
            for _ in range(args.max_new_tokens - 1):
                out = model(token, **{cache_arg: getattr(out, cache_arg)}, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
        return timer.seconds

    for prompt_len in args.decode_prompts:
        row = decode_rounds(hf_decode_seconds, Decode(prompt_len, args.max_new_tokens), weight_bytes, impl, bench)
        rows.append(row)
        print(f"transformers decode {row.tokens}: {row.median_tps:.2f} tokens/s", flush=True)
    return rows


def transformers_version() -> str:
    import transformers
    return transformers.__version__
