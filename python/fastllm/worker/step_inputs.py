"""What the torch executor reads off a BatchPlan besides the model inputs, as numpy arrays (no
torch): the sampling kernel's per-row arguments, and the prompt logprobs of the step
(``score_prompt_logprobs``, attached to the step's result with ``with_prompt_logprobs``). The
engine's BatchPlan already holds them in the kernel's form (the penalty lists split into prompt
and output tokens, the prompt rows to score and their targets), as the C++ CPU executor reads
them: nothing is derived twice.

Prompt logprobs are computed by the sampling kernel too: a greedy row whose allowed tokens are
only the target returns the target's log-softmax over the raw logits (its "sampled logprob") and
the row's top tokens, with the same arithmetic as the sampled tokens' logprobs and on any device.
"""

from __future__ import annotations

import numpy as np

# Rows of prompt logprobs scored per kernel call: bounds the [rows, vocab] logits.
PROMPT_LOGPROB_CHUNK = 256


def _nonempty(ids: np.ndarray) -> np.ndarray:
    """CSR ids with at least one element: an empty array's data pointer may be null, which the
    sampling kernel takes for "no ids given" (every sampled row at its first output token, with
    penalties on). The offsets never reach the padding."""
    return np.ascontiguousarray(ids) if len(ids) else np.zeros(1, dtype=ids.dtype)


def sampling_inputs(plan) -> dict:
    """Keyword arguments of ``ops.sample`` for the plan's sampled rows (numpy arrays, or ints)."""
    rows = plan.num_samples
    kw: dict = {
        "temperature": plan.temperature,
        "top_k": plan.top_k,
        "top_p": plan.top_p,
        "min_p": plan.min_p,
        "seeds": plan.seeds,
        "generator_offsets": plan.output_positions,
        # Unseeded rows draw from a per-step stream of the engine's seed (the plan mixes them).
        "global_seed": plan.sampling_seed,
    }
    if len(plan.penalty_prompt_ids):
        # The plan splits each penalised row's history into prompt and output lists.
        kw.update(
            repetition_penalty=plan.repetition_penalty,
            presence_penalty=plan.presence_penalty,
            frequency_penalty=plan.frequency_penalty,
            prompt_offsets=plan.penalty_prompt_offsets.copy(),
            prompt_ids=_nonempty(plan.penalty_prompt_ids),
            output_offsets=plan.penalty_output_offsets.copy(),
            output_ids=_nonempty(plan.penalty_output_ids),
        )
    if len(plan.bias_token_ids):
        # The request's logit_bias, plus -inf for EOS/stop ids of rows below min_tokens.
        kw.update(
            bias_offsets=plan.bias_offsets.copy(),
            bias_ids=plan.bias_token_ids.copy(),
            bias_values=plan.bias_values.copy(),
        )
    if len(plan.allowed_token_ids):
        kw.update(
            allowed_offsets=plan.allowed_offsets.copy(),
            allowed_ids=plan.allowed_token_ids.copy(),
        )
    if plan.typical_acceptance:
        # Speculative decoding's typical acceptance: the draft each verify row checks.
        kw.update(
            draft_ids=plan.draft_token_ids.copy(),
            typical_threshold=plan.typical_threshold,
            typical_alpha=plan.typical_alpha,
        )
    num_logprobs = plan.num_logprobs
    kw["num_top_logprobs"] = int(num_logprobs.max()) if rows and num_logprobs.max() > 0 else 0
    return kw


def score_prompt_logprobs(plan, logits_of, score) -> tuple | None:
    """This step's prompt logprobs as ``StepResult.set_prompt_logprobs`` takes them: (sequence
    index, token logprob, top ids or None, top logprobs or None) per scored position, or None.
    The executor supplies ``logits_of(rows)`` (the output projection of those rows of its hidden
    states) and ``score(logits, allowed_offsets, allowed_ids, num_top_logprobs)`` (the sampling
    kernel on them, returning numpy (token logprob, top logprobs, top ids)); rows go
    ``PROMPT_LOGPROB_CHUNK`` at a time."""
    scored = _prompt_logprob_targets(plan)
    if scored is None:
        return None
    rows, targets, seqs = scored
    k = int(plan.prompt_logprobs.max())
    token_lp, top_lp, top_ids = [], [], []
    for start in range(0, len(rows), PROMPT_LOGPROB_CHUNK):
        chunk = slice(start, start + PROMPT_LOGPROB_CHUNK)
        logits = logits_of(rows[chunk])
        # One allowed token per row, the target: its "sampled" logprob is the target's.
        offsets = np.arange(len(targets[chunk]) + 1, dtype=np.int32)
        lp, values, indices = score(logits, offsets, targets[chunk], k)
        token_lp.append(lp)
        top_lp.append(values)
        top_ids.append(indices)
    return (seqs, np.concatenate(token_lp),
            np.concatenate(top_ids) if k > 0 else None,
            np.concatenate(top_lp) if k > 0 else None)


def _prompt_logprob_targets(plan) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rows of this step's hidden states, int32 prompt token each row scores, int32 sequence
    index of each row), as the plan lists them (BatchPlan.prompt_logprob_rows), or None."""
    if not len(plan.prompt_logprob_rows):
        return None
    return (plan.prompt_logprob_rows.astype(np.int64), plan.prompt_logprob_targets.copy(),
            plan.prompt_logprob_seqs.copy())


def with_prompt_logprobs(result, prompt_logprobs: tuple | None):
    """``result`` (a StepResult) carrying this step's prompt logprobs, if any."""
    if prompt_logprobs is not None:
        result.set_prompt_logprobs(*prompt_logprobs)
    return result
