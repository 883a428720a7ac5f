"""The chat template of alignment data: a tokenizer (HF dir or engine checkpoint) that renders a conversation into
prompt and assistant segments, tokenized one by one, so the loss mask is exact per token (see
:mod:`ellama_recipes.data.chat` for the rules). Llama 3.1's template when the tokenizer has none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ellama_recipes.data.records import WRONG_TYPE, RecordError
from ellama_recipes.errors import UserError

# reject reasons the rendering itself finds (the row rules' reasons are in ellama_recipes.data.chat)
CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
PROMPT_TOO_LONG = "prompt_too_long"


def tokenizer_dir(path: str | Path) -> Path:
    """The HF tokenizer folder of ``path``: the folder itself, or an engine checkpoint's ``context/nemo_tokenizer``
    (a run folder is resolved to its checkpoint first, by ``ellama align`` / ``ellama_recipes.workflows.import_export``)."""
    p = Path(path)
    for cand in (p, p / "context" / "nemo_tokenizer"):
        if (cand / "tokenizer_config.json").is_file() or (cand / "tokenizer.json").is_file():
            return cand
    raise UserError(
        f"No tokenizer found at {str(p)!r} (looked for tokenizer.json / tokenizer_config.json there and in "
        f"context/nemo_tokenizer/). Fix: pass an engine checkpoint written by `ellama import-hf` or `ellama pretrain`, "
        f"or a Hugging Face tokenizer folder."
    )


class ChatTokenizer:
    """A Hugging Face tokenizer plus the chat template, rendering conversations into masked token ids."""

    def __init__(self, hf_tokenizer: Any, name: str = "") -> None:
        from ellama_recipes.data.tokenizer_train import LLAMA31_CHAT_TEMPLATE

        self.tok = hf_tokenizer
        self.name = name
        own = getattr(hf_tokenizer, "chat_template", None)
        self.template = own if isinstance(own, str) and own else LLAMA31_CHAT_TEMPLATE
        self.template_source = "tokenizer" if self.template is own else "llama3.1 (built in)"
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else hf_tokenizer.eos_token_id)
        self.vocab_size = len(hf_tokenizer)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, chat_template=self.template, add_generation_prompt=add_generation_prompt
        )

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, is_assistant)`` segments whose concatenation is the full render."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not head.startswith(done) or not full.startswith(head):
                raise RecordError(
                    WRONG_TYPE, "the chat template does not render this conversation prefix by prefix (cannot mask)"
                )
            out.append((head[len(done) :], False))
            out.append((full[len(head) :], True))
            done = full
        rest = self.render(messages)[len(done) :]
        if rest:
            out.append((rest, False))
        return [(t, a) for t, a in out if t]

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_sft(self, messages: list[dict[str, str]], seq_length: int) -> tuple[dict[str, list[int]], bool]:
        """``({"input_ids", "loss_mask"}, truncated)``; :class:`RecordError` ``prompt_too_long`` when no assistant
        token is left inside ``seq_length + 1`` ids (no label to learn)."""
        ids: list[int] = []
        mask: list[int] = []
        for text, is_assistant in self.segments(messages):
            piece = self.encode(text)
            ids.extend(piece)
            mask.extend([int(is_assistant)] * len(piece))
        limit = seq_length + 1
        truncated = len(ids) > limit
        ids, mask = ids[:limit], mask[:limit]
        if not any(mask[1:]):
            raise RecordError(
                PROMPT_TOO_LONG, f"the prompt fills the {seq_length}-token sequence: no response token is left to train on"
            )
        return {"input_ids": ids, "loss_mask": mask}, truncated

    def encode_pair(self, pair: dict[str, Any], seq_length: int) -> tuple[dict[str, list[int]], bool]:
        """``({"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}, truncated)`` for a validated
        preference row: full sequences (shared prompt ids + response ids), masks 1 on the response tokens."""
        prompt = pair["prompt"]
        responses = {}
        prompt_ids: list[int] | None = None
        for name in ("chosen", "rejected"):
            segs = self.segments(prompt + [{"role": "assistant", "content": pair[name]}])
            # the last segment is the response; everything before it is the (shared) prompt
            p_ids = [t for text, a in segs[:-1] for t in self.encode(text)]
            r_ids = self.encode(segs[-1][0])
            if prompt_ids is not None and p_ids != prompt_ids:
                raise RecordError(WRONG_TYPE, "chosen and rejected render different prompts (chat template problem)")
            prompt_ids, responses[name] = p_ids, r_ids
        assert prompt_ids is not None
        room = seq_length + 1 - len(prompt_ids)
        if room < 1:
            raise RecordError(
                PROMPT_TOO_LONG,
                f"the prompt has {len(prompt_ids)} tokens: it leaves no room for a response in a {seq_length}-token sequence",
            )
        truncated = any(len(r) > room for r in responses.values())
        chosen, rejected = responses["chosen"][:room], responses["rejected"][:room]
        if chosen == rejected:
            raise RecordError(CHOSEN_EQUALS_REJECTED, "chosen and rejected are the same tokens after truncation")
        p = len(prompt_ids)
        return {
            "chosen_ids": prompt_ids + chosen,
            "chosen_mask": [0] * p + [1] * len(chosen),
            "rejected_ids": prompt_ids + rejected,
            "rejected_mask": [0] * p + [1] * len(rejected),
        }, truncated


def load_chat_tokenizer(path: str | Path) -> ChatTokenizer:
    """The tokenizer of an HF tokenizer folder or an engine checkpoint (see :func:`tokenizer_dir`)."""
    d = tokenizer_dir(path)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot load the tokenizer in {str(d)!r}: {exc}. Fix: re-create the checkpoint.") from None
    return ChatTokenizer(tok, str(d))
