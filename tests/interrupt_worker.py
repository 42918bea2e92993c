"""A real Ctrl-C (SIGINT sent by the process to itself) at one moment of a script, in a process of its own so
that Python's own SIGINT handler, not pytest's, meets it:

  interrupt_worker.py CHECKPOINT TEXT

runs generate.py's main interrupted while loading the model, in the prompt's prefill, and in the third decode
step, then eval.py's main in its second chunk; prints one JSON object: for each moment, the exit status main
ended with and what it printed on stderr."""
import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as eval_script  # noqa: E402
import generate as generate_script  # noqa: E402
import generation  # noqa: E402


def interrupting(module, name: str, call: int):
    """module.name, which sends SIGINT to this process at its call-th call, then goes on as itself: the
    KeyboardInterrupt comes from inside it, at the next instruction Python runs."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    return real, wrapper


def run(main, argv: list, module, name: str, call: int) -> dict:
    real, wrapper = interrupting(module, name, call)
    setattr(module, name, wrapper)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        setattr(module, name, real)
    return {"status": status, "stderr": err.getvalue()}


def main():
    checkpoint, text = sys.argv[1:3]
    generate_argv = ["--checkpoint_path", checkpoint, "--device", "cpu", "--num_samples", "1", "--max_new_tokens", "8",
                     "--threads", "1"]
    eval_argv = ["--checkpoint_path", checkpoint, "--text", text, "--context", "8", "--device", "cpu", "--threads", "1"]
    print(json.dumps({
        "load": run(generate_script.main, generate_argv, generate_script, "load_model", 1),
        "prefill": run(generate_script.main, generate_argv, generation, "prefill", 1),
        "decode": run(generate_script.main, generate_argv, generation, "decode_one_token", 3),
        "eval": run(eval_script.main, eval_argv, eval_script, "next_token_log_probs", 2),
    }))


if __name__ == "__main__":
    main()
