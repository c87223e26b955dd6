"""The vLLM side of the HF equivalence tests: log-probs from a chat reply, and the comparison."""

from __future__ import annotations

import torch


def reply_logprobs(out: dict) -> tuple[list[int], torch.Tensor, list[int], torch.Tensor]:
    """(prompt ids, prompt log-probs [L - 1], generated ids, their log-probs) of a chat reply
    requested with ``prompt_logprobs: 0``, ``logprobs: true`` and ``return_token_ids: true``."""
    prompt_ids = out["prompt_token_ids"]
    entries = zip(prompt_ids[1:], out["prompt_logprobs"][1:], strict=True)
    prompt = [entry[str(token)]["logprob"] for token, entry in entries]
    choice = out["choices"][0]
    generated = [step["logprob"] for step in choice["logprobs"]["content"]]
    return prompt_ids, torch.tensor(prompt), choice["token_ids"], torch.tensor(generated)


def assert_matches_reference(
    label: str,
    got: tuple[list[int], torch.Tensor, list[int], torch.Tensor],
    ref,
    ref_generated_lp: torch.Tensor,
    tolerance: float,
) -> None:
    """vLLM's prompt ids equal the reference's; prompt and decode log-probs within tolerance.

    got: :func:`reply_logprobs`; ref: a reference with ``prompt_ids`` and ``prompt_logprobs``
    [L - 1]; ref_generated_lp: [G] the reference's log-probs of vLLM's generated tokens.
    """
    ids, prompt_lp, _, generated_lp = got
    assert ids == ref.prompt_ids
    prompt_diff = (prompt_lp.double() - ref.prompt_logprobs).abs().max().item()
    decode_diff = (generated_lp.double() - ref_generated_lp).abs().max().item()
    print(f"{label}: {len(ids)} prompt tokens, "
          f"max |diff| prompt {prompt_diff:.2e}, generated {decode_diff:.2e}")  # fmt: skip
    assert prompt_diff <= tolerance
    assert decode_diff <= tolerance
