"""SentencePiece tokenizer wrapper with Gemma's special ids and the Gemma chat templates.

Gemma ids: pad 0, eos 1, bos 2, unk 3. Two turn formats (docs/reference.md#tokenizer-and-chat-template):
- Gemma 1-3: `<start_of_turn>` / `<end_of_turn>` (106 / 107 in the Gemma 1-2 vocabulary, 105 / 106 in Gemma 3's),
  no system role: the system text plus a blank line goes in front of the user message (Gemma 3's HF template).
- Gemma 4: `<|turn>` / `<turn|>` (105 / 106 in its vocabulary) and a system turn of its own:
  `<|turn>system\n{system}<turn|>\n<|turn>user\n{message}<turn|>\n<|turn>model\n`.
The format is chosen by which pieces the tokenizer has (Gemma 4's when it has both `<|turn>` and `<turn|>`), and
the markers are looked up by piece, never by id, so any real vocabulary and a small test tokenizer work. The
instruction-tuned models stop on eos OR the end-of-turn marker; both are in `stop_ids`.
"""

import os

import sentencepiece as spm

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
GEMMA4_START_OF_TURN = "<|turn>"
GEMMA4_END_OF_TURN = "<turn|>"


class Tokenizer:
    def __init__(self, model_path: str):
        model_path = os.fspath(model_path)
        if os.path.isdir(model_path):
            model_path = os.path.join(model_path, "tokenizer.model")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError on a corrupt file
            raise ValueError(f"{model_path}: not a valid sentencepiece model ({e})") from None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        # Gemma 4's markers when the tokenizer has both, else Gemma 1-3's.
        gemma4 = all(self._piece_id(p) is not None for p in (GEMMA4_START_OF_TURN, GEMMA4_END_OF_TURN))
        self.system_turn = gemma4  # Gemma 4 has a system turn; Gemma 1-3 put the system text in the user turn
        self.start_of_turn, self.end_of_turn = ((GEMMA4_START_OF_TURN, GEMMA4_END_OF_TURN) if gemma4
                                                else (START_OF_TURN, END_OF_TURN))
        self.start_of_turn_id = self._piece_id(self.start_of_turn)
        self.end_of_turn_id = self._piece_id(self.end_of_turn)
        self.stop_ids = tuple(i for i in (self.eos_id, self.end_of_turn_id) if i is not None and i >= 0)

    def _piece_id(self, piece):
        i = self.sp.PieceToId(piece)
        return None if i == self.sp.unk_id() else i

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        """Decode ids, dropping pad and everything from the first stop id on."""
        out = []
        for i in (int(i) for i in ids):
            if i in self.stop_ids:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(i)
        return self.sp.DecodeIds(out)

    def chat_prompt(self, message: str, system: str | None = None) -> str:
        """Gemma chat template text for one user turn, ending where the model's answer starts.

        Gemma 1-3 have no system role: system text is prepended to the user message, separated by a blank line.
        Gemma 4 gives it a system turn before the user turn. The leading <bos> is not part of the text: encode
        with add_bos=True. Messages are used as given (the published templates strip them; data/ strips prompts).
        """
        sot, eot = self.start_of_turn, self.end_of_turn
        head = ""
        if system and self.system_turn:
            head = f"{sot}system\n{system}{eot}\n"
        elif system:
            message = f"{system}\n\n{message}"
        return f"{head}{sot}user\n{message}{eot}\n{sot}model\n"

    def encode_chat(self, message: str, system: str | None = None) -> list[int]:
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise ValueError(f"{self.path}: tokenizer lacks {START_OF_TURN} / {END_OF_TURN} (or Gemma 4's "
                             f"{GEMMA4_START_OF_TURN} / {GEMMA4_END_OF_TURN}) pieces for the chat template")
        return self.encode(self.chat_prompt(message, system), add_bos=True)

    def chat_parts(self, message: str, system: str | None = None) -> tuple[list[int], list[int], list[int]]:
        """(head, message, tail) ids: the template's opening (<bos>, user turn, system text), the message, and the
        turn's end up to the model's turn. When the template tokenises with the head as a prefix and the tail as a
        suffix (Gemma's turn markers are special pieces), the parts are slices of `encode_chat` itself, so the
        untruncated prompt is exactly the template's tokenisation; otherwise the message is encoded on its own."""
        full = self.encode_chat(message, system)
        head_text, tail_text = self.chat_prompt("\x00", system).split("\x00")
        head, tail = self.encode(head_text, add_bos=True), self.encode(tail_text)
        if full[:len(head)] == head and full[len(full) - len(tail):] == tail and len(full) >= len(head) + len(tail):
            return head, full[len(head):len(full) - len(tail)], tail
        return head, self.encode(message), tail

    def encode_chat_within(self, message: str, system: str | None, max_tokens: int, *,
                           min_message_tokens: int = 1) -> list[int]:
        """`encode_chat` cut to at most `max_tokens` ids by dropping the OLDEST message tokens: the template's head
        and tail and the end of the message (usually what is asked) are kept, as Tunix keeps a prompt's last tokens.
        The one prompt-truncation rule of SFT and GRPO. ValueError when fewer than `min_message_tokens` message
        tokens fit."""
        head, msg, tail = self.chat_parts(message, system)
        room = max_tokens - len(head) - len(tail)
        if room < min(min_message_tokens, len(msg)):
            raise ValueError(f"a budget of {max_tokens} tokens leaves no room for the message after the chat template "
                             f"and system prompt ({len(head) + len(tail)} tokens)")
        return head + msg[max(len(msg) - room, 0):] + tail
