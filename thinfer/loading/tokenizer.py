"""`Tokenizer`: the few tokenizer operations the engine needs, over a transformers tokenizer.

It exists so that the rest of thinfer does not depend on transformers' tokenizer API. It is built
from a HF directory (`tokenizer.json` and friends) or from a GGUF file's metadata; both are read
offline. transformers is imported lazily: importing it costs seconds.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Files whose presence means a HF directory carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    `eos_token_ids` is the tokenizer's own end-of-sequence id followed by `extra_eos_ids` (for
    example the ids a model's `generation_config.json` lists), without duplicates.
    """

    def __init__(
        self, hf_tokenizer: PreTrainedTokenizerBase, extra_eos_ids: list[int] | None = None
    ) -> None:
        self._tok = hf_tokenizer
        ids = [] if hf_tokenizer.eos_token_id is None else [hf_tokenizer.eos_token_id]
        self._eos_token_ids = list(dict.fromkeys(ids + list(extra_eos_ids or [])))

    @classmethod
    def from_pretrained(
        cls, path: str, gguf_file: str | None = None, extra_eos_ids: list[int] | None = None
    ) -> Tokenizer:
        """Load from a HF directory, or from `gguf_file` (a file name inside directory `path`).

        Raises ValueError naming the directory or file when no tokenizer can be built from it.
        """
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        source = os.path.join(path, gguf_file) if gguf_file else path
        try:
            if gguf_file:
                # The fast class builds straight from the GGUF vocabulary; AutoTokenizer would
                # first parse the whole file again to find a model config (seconds).
                hf_tok = PreTrainedTokenizerFast.from_pretrained(
                    path, gguf_file=gguf_file, local_files_only=True
                )
            else:
                hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many kinds here
            raise ValueError(f"{source}: cannot build a tokenizer: {exc}") from exc
        return cls(hf_tok, extra_eos_ids)

    def save(self, directory: str) -> None:
        """Write the HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat
        template) into `directory`."""
        self._tok.save_pretrained(directory)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a sequence."""
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, if the tokenizer has one."""
        return self._tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self._tok)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special tokens (bos, eos, pad, and control tokens such as <|im_start|>).

        transformers' own `all_special_ids` leaves out the control tokens a GGUF vocabulary
        marks special (SmolLM2: 3 of 17), so the special added tokens are merged in.
        """
        added = [i for i, t in self._tok.added_tokens_decoder.items() if t.special]
        return sorted(set(self._tok.all_special_ids) | set(added))

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None when the tokenizer has none."""
        template = self._tok.chat_template
        return template if isinstance(template, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS where the tokenizer wants them."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Vocabulary strings of `ids` (byte-level BPE spells a leading space as "Ġ")."""
        return list(self._tok.convert_ids_to_tokens(ids))

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ({"role", "content"} dicts) with the model's chat template."""
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self._tok.name_or_path!r} has no chat template; "
                "pass a plain prompt instead of messages"
            )
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
