"""Exactness checks on every position of a question, not only its last: a stream's question logits
at each of the question's tokens against the one-shot forward's logits at the same tokens.

Float32 noise between a stream and a one-shot forward is about 1e-7, while a token at a position
off by one moves the logits by about 1e-4: the exactness tests check 1e-6."""

from __future__ import annotations

import torch

from streamtc.session import StreamingSession

def question_logits(session: StreamingSession, question: str) -> torch.Tensor:
    """[n, V] float32 logits at every token of `question`'s pre-fill in the stream (the prompt
    `next_token_logits` pre-fills), read from the LLM's output in that forward."""
    outputs: list[torch.Tensor] = []
    handle = session.host.language_model.register_forward_hook(
        lambda module, args, output: outputs.append(output.last_hidden_state[0]))
    try:
        last = session.next_token_logits(question)
    finally:
        handle.remove()
    with torch.inference_mode():
        logits = session.model.lm_head(outputs[-1]).float().cpu()  # the question's forward is the last
    assert (logits[-1] - last).abs().max() <= 1e-6  # the forward read is the question's (matmul shape aside)
    return logits


def max_question_diff(session: StreamingSession, question: str, one_shot: torch.Tensor) -> float:
    """Largest difference between the stream's logits at every question token and the one-shot
    forward's logits [L, V] (its whole sequence) at the same, final, tokens."""
    got = question_logits(session, question)
    return (got - one_shot[-len(got):].float().cpu()).abs().max().item()


__all__ = ["max_question_diff", "question_logits"]
