"""The sampling controls (generation.py) against transformers' own logits processors: the same tokens allowed
and the same renormalized probabilities, row by row of a batch whose rows each have their own values; the
draw following that distribution; the repetition penalty counting the prompt, the earlier turns and the new
tokens; stop strings that span tokens; and the compiled decode step staying one graph with every control on."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from conftest import load_ours
from generation import (StopStrings, decode_one_token, filtered, generate_batch, penalize_repetition, sample,
                        sampling)

V = 1000
# Each row its own controls: (temperature, top_k, top_p, min_p, repetition_penalty); 0, 1, 0, 1 are off.
ROWS = [(0.7, 50, 0.9, 0.0, 1.0), (1.3, 0, 0.8, 0.05, 1.3), (1.0, 20, 1.0, 0.2, 0.8), (0.9, 0, 1.0, 0.0, 1.0),
        (1.0, 400, 0.5, 0.0, 1.2)]
# One top_k for every row (the command line's case: the top-k draw is then the filter itself).
ONE_K = [(t, 50, p, m, r) for t, _, p, m, r in ROWS]


def transformers_kept(logits: torch.Tensor, ids: torch.Tensor, temperature, top_k, top_p, min_p, penalty):
    """transformers' processors for one row, as its generate() orders them (each added only when on, as it does):
    the logits [V] of the allowed tokens, -inf elsewhere."""
    scores = logits[None].clone()
    if penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids[None], scores)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    for warper in warpers:
        scores = warper(ids[None], scores)
    return scores[0]


def ours_kept(logits: torch.Tensor, ids: list, rows: list) -> torch.Tensor:
    """generation.py's filtering of the batch, every row with its own values: the logits [B, V] of the
    allowed tokens, -inf elsewhere."""
    temperature, top_k, top_p, min_p, penalty = (list(values) for values in zip(*rows))
    s = sampling(len(rows), "cpu", temperature, top_k, top_p, min_p, penalty)
    seen = torch.zeros(len(rows), V, dtype=torch.bool)
    for b, row_ids in enumerate(ids):
        seen[b, row_ids] = True
    kept, kept_ids = filtered(penalize_repetition(logits, seen, s.repetition_penalty), s)
    full = torch.full_like(logits, float("-inf"))
    return full.scatter(1, kept_ids, kept) if kept_ids is not None else kept


def unambiguous(penalized: torch.Tensor, temperature, top_k, top_p, min_p):
    """The test data leave no token within rounding of a threshold, so that both implementations must keep
    exactly the same tokens: the chain followed in float64, where float32 computes each probability and
    cumulative sum to a relative 1e-6 or so; the margins asked are 100 times that. No ties at the k-th."""
    ranked = (penalized.double() / temperature).sort(descending=True).values
    if top_k:
        assert ranked[top_k - 1] > ranked[top_k]
        ranked = ranked[:top_k]
    if top_p < 1.0:  # the probability of the likelier tokens before each, against top_p
        probs = torch.softmax(ranked, dim=-1)
        before = probs.cumsum(0) - probs
        assert (before - top_p).abs().min() > 1e-4
        ranked = ranked[before < top_p]
    if min_p:
        probs = torch.softmax(ranked, dim=-1)
        assert (probs / probs[0] - min_p).abs().min() > 1e-4


@pytest.mark.parametrize("rows", [ROWS, ONE_K], ids=["own-k", "one-k"])
def test_filters_keep_what_transformers_keeps_row_by_row(rows):
    torch.manual_seed(0)
    logits = torch.randn(len(rows), V) * 1.5  # [B, V]
    ids = [torch.randint(0, V, (30,)) for _ in rows]  # each row's sequence so far, repeats included
    ours = ours_kept(logits, ids, rows)
    for b, (temperature, top_k, top_p, min_p, penalty) in enumerate(rows):
        expected = transformers_kept(logits[b], ids[b], temperature, top_k, top_p, min_p, penalty)
        # The same tokens allowed...
        allowed = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(ours[b]), allowed), b
        # Each row's controls removed some tokens and kept more than one; the row with all of them off, none.
        assert 1 < allowed.sum() < V or (rows[b][1:] == (0, 1.0, 0.0, 1.0) and allowed.all()), b
        # ... with the same probabilities, renormalized over them: exp of the same float32 logits (penalized and
        # tempered by the same float32 operations), each divided by a float32 sum of N terms, whose order of
        # summation may differ: a relative error of at most N units of 2^-24 in the sum, one more for exp and
        # for the division.
        n = int(allowed.sum())
        torch.testing.assert_close(torch.softmax(ours[b], -1), torch.softmax(expected, -1), rtol=(n + 2) * 2 ** -24,
                                   atol=0)
    for b, (temperature, top_k, top_p, min_p, penalty) in enumerate(rows):
        seen = torch.zeros(V, dtype=torch.bool).index_fill_(0, ids[b], True)
        penalized = torch.where(seen, torch.where(logits[b] < 0, logits[b] * penalty, logits[b] / penalty), logits[b])
        unambiguous(penalized, temperature, top_k, top_p, min_p)


def test_draws_follow_the_filtered_distribution():
    """The exponential race draws each allowed token with its renormalized probability, and nothing else:
    20000 draws of one row (min-p and top-p leave a few tokens), each token's count within 5 standard
    deviations of the binomial's mean."""
    torch.manual_seed(1)
    logits = torch.randn(1, V).repeat(20000, 1) * 3
    s = sampling(20000, "cpu", 0.8, 40, 0.95, 0.02)
    kept, ids = filtered(logits[:1], sampling(1, "cpu", 0.8, 40, 0.95, 0.02))
    probs = torch.zeros(V, dtype=torch.float64).scatter(0, ids[0], torch.softmax(kept[0].double(), -1))
    counts = torch.bincount(sample(logits, s)[:, 0], minlength=V).double()
    assert 2 < int((probs > 0).sum()) < 40
    assert counts[probs == 0].sum() == 0
    assert ((counts - 20000 * probs).abs() <= 5 * (20000 * probs * (1 - probs)).sqrt() + 1).all()


def test_greedy_rows_of_a_sampled_batch_take_the_penalized_argmax():
    """Temperature 0 in a row is greedy there, whatever the other rows draw, even between two tokens a hair
    apart (a tiny temperature would draw either); transformers' greedy search takes the penalty too: the
    likeliest token, seen already, falls behind the next."""
    torch.manual_seed(2)
    logits = torch.randn(64, V)
    top = logits.argmax(dim=-1)  # [64]
    second = logits.clone().scatter_(1, top[:, None], float("-inf")).argmax(dim=-1)
    logits[torch.arange(64), second] = logits[torch.arange(64), top] - 1e-6  # a near tie for the lead
    seen = torch.zeros(64, V, dtype=torch.bool)
    seen[0, top[0]] = True  # the first row has seen its likeliest token
    s = sampling(64, "cpu", [0.0, 1.0] * 32, repetition_penalty=1.3)._replace(seen=seen)
    penalized = RepetitionPenaltyLogitsProcessor(1.3)(top[:1, None], logits[:1].clone())
    drawn = sample(logits, s)[:, 0]
    assert drawn[0] == penalized.argmax() == second[0]
    assert torch.equal(drawn[2::2], top[2::2])  # the other greedy rows
    assert not torch.equal(drawn[1::2], top[1::2])  # the sampled rows did sample


class FixedLogits(torch.nn.Module):
    """A model whose every position prefers token 5 (logit 2.0), then 6 (1.9), then 7 (1.0), then the rest (0)."""

    class config:
        vocab_size = 16

    def forward(self, x, input_pos):
        logits = torch.zeros(*x.shape, 16)
        logits[..., 5], logits[..., 6], logits[..., 7] = 2.0, 1.9, 1.0
        return logits


def test_repetition_penalty_counts_the_prompt_the_earlier_turns_and_the_new_tokens():
    """Greedy with a penalty of 1.5: a token in the prompt, in the conversation before it (`earlier`), or
    generated already is divided by 1.5, so 5 (2.0 -> 1.33) loses to 6 (1.9) once seen, and 6 (-> 1.27) then
    to 5 again; 7 (1.0) never wins."""
    def new_tokens(prompt, earlier=None):
        seq, = generate_batch(FixedLogits(), [torch.tensor(prompt)], 3, temperature=0, repetition_penalty=1.5,
                              earlier=earlier)
        return seq[len(prompt):].tolist()
    assert new_tokens([1, 2]) == [5, 6, 5]  # 5 then counts as seen: 6, then both seen: 5 (1.33 > 1.27)
    assert new_tokens([1, 5]) == [6, 5, 5]
    assert new_tokens([1, 2], earlier=[[9, 5]]) == [6, 5, 5]
    seq, = generate_batch(FixedLogits(), [torch.tensor([1, 5])], 3, temperature=0)  # off: 5 every time
    assert seq[2:].tolist() == [5, 5, 5]


def scripted_steps(tokens: list):
    """Fake prefill and decode steps that produce `tokens` in turn, for every sequence of the batch: [B, 1]."""
    steps = iter(tokens)

    def step(model, x, input_pos, s, last=None):
        return torch.full((x.size(0), 1), next(steps))
    return step


def test_stop_strings_end_a_sequence_at_the_token_that_completes_them(tokenizer):
    """A stop string spanning tokens ('o wo' across 'Hello' and ' world'), and one spanning the four byte
    tokens of an emoji and the token after it; the sequence ends with the token that completed the string.
    A stop of one row leaves the other running."""
    def run(text: str, stops: list, batch: int = 1) -> list:
        ids = tokenizer.encode(text)
        step = scripted_steps(ids)
        seqs = generate_batch(None, [torch.tensor([1])] * batch, len(ids), prefill_fn=step, decode_fn=step,
                              stop=[StopStrings(tokenizer, s) if s else None for s in stops])
        return [tokenizer.decode(seq[1:].tolist()) for seq in seqs]

    assert run("Hello world and more words", [["o wo"]]) == ["Hello world"]
    assert run("Hello world and more words", [["absent"]]) == ["Hello world and more words"]
    assert run("We say 🦩! and go on talking", [["🦩!"]]) == ["We say 🦩!"]
    assert tokenizer.encode("🦩!")[-5:-1] == [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in "🦩".encode()]
    assert run("Hello world and more words", [["and"], None], batch=2) == ["Hello world and",
                                                                          "Hello world and more words"]
    # Only the new text counts: a stop string in the prompt ends nothing.
    prompt, new = tokenizer.encode("Hello there"), tokenizer.encode("and more Hello words")
    step = scripted_steps(new)
    seq, = generate_batch(None, [torch.tensor(prompt)], len(new), prefill_fn=step, decode_fn=step,
                          stop=StopStrings(tokenizer, ["Hello"]))
    assert tokenizer.decode(seq[len(prompt):].tolist()) == "and more Hello"


@pytest.mark.usefixtures("one_thread")
def test_compiled_decode_step_is_one_graph_with_every_control_on(checkpoint):
    """Every control on, for batches of two of the same shape: dynamo compiles the decode step once (the
    controls are tensors and constants that do not change per step) and it draws what the eager step draws."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(decode_one_token, backend=counter, fullgraph=True, dynamic=False)
    model = load_ours(checkpoint)
    model.setup_caches(max_batch_size=2, max_seq_length=64)
    controls = dict(temperature=[0.9, 1.2], top_k=[40, 0], top_p=[0.9, 1.0], min_p=[0.0, 0.05],
                    repetition_penalty=[1.3, 1.1])
    prompts = [torch.tensor([1, 415, 2936, 9060], dtype=torch.int), torch.tensor([1, 22557, 28725, 1526],
                                                                                  dtype=torch.int)]
    for seed in (0, 1):
        torch.manual_seed(seed)
        ours = generate_batch(model, prompts, 12, decode_fn=compiled, **controls)
        torch.manual_seed(seed)
        eager = generate_batch(model, prompts, 12, **controls)
        assert [s.tolist() for s in ours] == [s.tolist() for s in eager]
    assert counter.frame_count == 1
    torch._dynamo.reset()
