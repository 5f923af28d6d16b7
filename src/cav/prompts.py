"""Prompts against the text encoder's length limit: warn on any cut, refuse a cut that drops a placeholder token.

CLIP-style text encoders read at most ``tokenizer.model_max_length`` tokens (77 for ModelScope, 24 for the toy
model), start and end tokens included; tokenizers cut longer prompts without a word. A cut of plain words changes
what the prompt asks for, so it is reported (one line on the ``cav`` logger, shown on stderr by the CLI). A cut that
drops a textual-inversion placeholder would train or sample nothing of the absorbed appearance while the run
"succeeds", so it is refused (``CavError``) before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .errors import CavError

log = logging.getLogger("cav")


def placeholder_ids(tokenizer) -> dict[int, str]:
    """Tokens added to the tokenizer that are not special tokens (textual-inversion placeholders), id → text."""
    special = set(tokenizer.all_special_ids)
    return {i: t for t, i in tokenizer.get_added_vocab().items() if i not in special}


def cut(tokenizer, prompt: str) -> tuple[int, list[int]]:
    """(token count with start/end tokens, ids of the tokens a max-length cut drops) for one prompt."""
    ids = tokenizer(prompt, truncation=False).input_ids
    limit = tokenizer.model_max_length
    return len(ids), (list(ids[limit - 1:-1]) if len(ids) > limit else [])


def check_prompt(tokenizer, prompt: str, what: str = "the prompt", warn: bool = True) -> bool:
    """Refuse (CavError) a prompt whose cut drops a placeholder token; log one warning for any other cut.

    Returns whether the prompt is cut. ``what`` names the prompt in messages (e.g. ``--spatial-prompt``).
    """
    n, dropped = cut(tokenizer, prompt)
    if not dropped:
        return False
    limit = tokenizer.model_max_length
    kept = set(tokenizer(prompt, truncation=True).input_ids)
    lost = [t for i, t in placeholder_ids(tokenizer).items() if i in dropped and i not in kept]
    if lost:
        raise CavError(f"{what} is {n} tokens but the text encoder reads {limit}: the cut drops the textual-inversion "
                       f"token(s) {' '.join(lost)}, so they would learn nothing: shorten it or put them earlier")
    if warn:  # one short line, however long the prompt: its start names the cut, the count says how much
        text = _short(" ".join(tokenizer.decode(dropped).split()))
        log.warning(f"cav: warning: {what} is {n} tokens but the text encoder reads {limit}: everything from "
                    f"'{text}' on ({len(dropped)} tokens) is ignored (shorten it to keep it)")
    return True


def check_prompts(tokenizer, prompts: Iterable[str], what: str = "the prompt", reported: set | None = None) -> None:
    """``check_prompt`` for several prompts; a prompt already in ``reported`` is not warned about again (it is
    added to it), so a run that samples the same prompts at every checkpoint warns once."""
    for prompt in prompts:
        seen = reported is not None and prompt in reported
        if check_prompt(tokenizer, prompt, f"{what} '{_short(prompt)}'", warn=not seen) and reported is not None:
            reported.add(prompt)


def _short(prompt: str, n: int = 40) -> str:
    return prompt if len(prompt) <= n else prompt[: n - 1] + "…"
