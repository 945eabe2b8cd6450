"""Datasets -> token batches for LoRA fine-tuning.

Three steps, each its own function so a trainer can swap one without the others:

1. read: `load_examples` (or `read_jsonl`, `read_e2e`, `read_classification`) turns a file into
   `Example`s (prompt/completion) or `ClassificationExample`s. A malformed line is an error that
   names the file and its 1-based line, or, with `skip_bad_lines=True`, is counted in
   `LoadResult.skipped`, so a run never drops data without saying so.
2. tokenize: `tokenize_example` gives `input_ids` and `labels` with the prompt masked to -100, so
   the loss covers only the completion (the LoRA paper's E2E set-up trains on the reference only).
3. batch (`lorakit.batches`, its names re-exported here): `collate` pads, `pack` concatenates
   into fixed blocks, `Batches` shuffles with a seed and can save and restore its position so a
   resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import csv
import json
import numbers
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from lorakit.batches import IGNORE_INDEX, Batches, collate, pack  # noqa: F401  (re-exported: step 3)
from lorakit.demo_task import demo_task  # noqa: F401  (re-exported: the demo is one of the data sources)
from lorakit.hints import Setting, SettingError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """A generation example. `prompt == ""` is a plain `text` example: every token carries loss."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class ClassificationExample:
    """One text (or sentence pair, as in RTE) and its integer label."""

    text: str
    label: int
    text_pair: str | None = None


class DataFormatError(SettingError):
    """A malformed line; `path` and `line` (1-based) say where, so the user can open the file there.

    `parts` after the location are text and `Setting`s (the options that would fix it), so the
    command line can name its flags (`--skip-bad-lines`) where Python users read keywords.
    """

    def __init__(self, path: Path, line: int, *parts: str | Setting) -> None:
        super().__init__(f"{path}, line {line}: ", *parts)
        self.path, self.line = path, line


class LoadResult(list[T]):
    """What a reader returns: the list of examples, plus where they came from, what was skipped
    (`skipped`: (line, reason) pairs; `n_skipped`) and, for classification, the label map.

    Being a list, it goes straight into `Batches` or `split_holdout`.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.skipped: list[tuple[int, str]] = []
        self.label_map: dict[str, int] | None = None

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def _bad(self, line: int, reason: str, skip: bool) -> None:
        if not skip:
            raise DataFormatError(self.path, line, f"{reason} (or pass ", Setting("skip_bad_lines", True),
                                  " to skip such lines)")
        self.skipped.append((line, reason))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, line) pairs; blank lines are left out, so a trailing newline is no error."""
    with open(path, encoding="utf-8", newline="") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _json_records(result: LoadResult[Any], skip: bool) -> Iterator[tuple[int, Any]]:
    for number, line in _lines(result.path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            result._bad(number, f"not valid JSON ({e.msg} at column {e.colno})", skip)
            continue
        yield number, record


def read_jsonl(path: str | Path, skip_bad_lines: bool = False) -> LoadResult[Example]:
    """JSONL with `{"prompt", "completion"}` (loss on the completion) or `{"text"}` (loss on all of it)."""
    return _read_jsonl(Path(path), skip_bad_lines, text_lines=True)


def _read_jsonl(path: Path, skip_bad_lines: bool, text_lines: bool) -> LoadResult[Example]:
    """`read_jsonl`; with `text_lines=False` a plain "text" line is a bad line (`read_references`)."""
    result: LoadResult[Example] = LoadResult(path)
    for number, record in _json_records(result, skip_bad_lines):
        if not isinstance(record, dict):
            result._bad(number, f'expected a JSON object with "prompt" and "completion", or "text"; got '
                                f'{_json_kind(record)}', skip_bad_lines)
            continue
        used = ("prompt", "completion") if "prompt" in record or "completion" in record else ("text",)
        wrong = [k for k in used if k in record and not isinstance(record[k], str)]
        if wrong:
            result._bad(number, "; ".join(f'"{k}" must be a string, got {_json_kind(record[k])}' for k in wrong),
                        skip_bad_lines)
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            result.append(Example(record["prompt"], record["completion"]))
        elif isinstance(record.get("text"), str) and text_lines:
            result.append(Example("", record["text"]))
        elif isinstance(record.get("text"), str):
            result._bad(number, f'holds only "text", with no prompt to generate from and no reference to score '
                                f'against; {_REFERENCE_LINES}', skip_bad_lines)
        else:
            result._bad(number, f'expected string "prompt" and "completion", or "text"; got keys {sorted(record)}',
                        skip_bad_lines)
    return result


def _json_kind(value: Any) -> str:
    """A JSON value as a message shows it: `5 (a number)`, `null`, `a JSON list`."""
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    if value is None:
        return "null"
    kind = "true/false" if isinstance(value, bool) else "a number" if isinstance(value, (int, float)) else "a string"
    return f"{json.dumps(value)} ({kind})"


_REFERENCE_LINES = 'scoring needs JSONL lines with a string "prompt" and "completion" (the reference), or E2E lines ' \
                   '"MR||reference"'


def read_e2e(path: str | Path, skip_bad_lines: bool = False) -> LoadResult[Example]:
    """E2E lines `MR||reference` (the LoRA repository's format) as prompt = MR, completion = reference.

    The reference's trailing space (present in every line of the released files) is stripped: the
    completion ends with EOS, and a space before it is noise to learn.
    """
    result: LoadResult[Example] = LoadResult(Path(path))
    for number, line in _lines(result.path):
        mr, sep, reference = line.partition("||")
        if not sep or not mr.strip() or not reference.strip():
            result._bad(number, "expected 'MR||reference' with both parts non-empty", skip_bad_lines)
            continue
        result.append(Example(mr.strip(), reference.strip()))
    return result


def read_classification(path: str | Path, text_column: str = "sentence", label_column: str = "label",
                        text_pair_column: str | None = None, label_map: Mapping[str, int] | None = None,
                        delimiter: str | None = None, quoting: bool | None = None,
                        skip_bad_lines: bool = False) -> LoadResult[ClassificationExample]:
    """Text (or a sentence pair) + label from JSONL, CSV or TSV (with a header row), by extension.

    For RTE pass `text_column="sentence1", text_pair_column="sentence2"`. Labels become ints: when
    `label_map` is given (e.g. the train split's, for the dev split) it is used and an unknown label
    is a bad line; otherwise labels that are all integers keep their value, and string labels
    (`entailment`/`not_entailment`) are numbered in sorted order, so the map is the same on every
    run. The map is returned as `LoadResult.label_map`.

    `quoting` defaults to off for TSV (GLUE TSVs are unquoted and RTE's text contains `"`) and on for CSV.
    """
    result: LoadResult[ClassificationExample] = LoadResult(Path(path))
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + [label_column]
    rows: list[tuple[int, str, str | None, str]] = []  # (line, text, pair, raw label)

    def take(number: int, record: Mapping[str, Any]) -> None:
        missing = [c for c in columns if not isinstance(record.get(c), (str, int)) or record.get(c) == ""]
        if missing:
            result._bad(number, f"missing or empty column(s) {missing} (text and labels are strings or ints)",
                        skip_bad_lines)
            return
        pair = str(record[text_pair_column]) if text_pair_column else None
        rows.append((number, str(record[text_column]), pair, str(record[label_column]).strip()))

    suffix = result.path.suffix.lower()
    if delimiter is None and suffix in (".jsonl", ".json"):
        for number, record in _json_records(result, skip_bad_lines):
            take(number, record if isinstance(record, dict) else {})
    else:
        delimiter = delimiter or ("," if suffix == ".csv" else "\t")
        quote = (delimiter != "\t") if quoting is None else quoting
        with open(result.path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE)
            header = next(reader, None)
            absent = [c for c in columns if header is None or c not in header]
            if absent:
                raise DataFormatError(result.path, 1, f"header {header} lacks column(s) {absent}; set ",
                                      Setting("text_column"), " / ", Setting("text_pair_column"), " / ",
                                      Setting("label_column"), " to the header's names")
            for fields in reader:
                if not any(x.strip() for x in fields):
                    continue
                if len(fields) != len(header):
                    result._bad(reader.line_num, f"expected {len(header)} fields {header}, found {len(fields)}",
                                skip_bad_lines)
                    continue
                take(reader.line_num, dict(zip(header, fields)))

    if label_map is None:
        raw = sorted({r[3] for r in rows})
        numeric = all(re.fullmatch(r"-?\d+", x) for x in raw)
        label_map = {x: int(x) if numeric else i for i, x in enumerate(raw)}
    for number, text, pair, raw_label in rows:
        if raw_label not in label_map:
            result._bad(number, f"label {raw_label!r} is not in the label map {dict(label_map)}", skip_bad_lines)
            continue
        result.append(ClassificationExample(text, label_map[raw_label], pair))
    result.label_map = dict(label_map)
    return result


def load_examples(path: str | Path, format: str = "auto", **kw: Any) -> LoadResult[Any]:
    """Read `path` with the reader its format calls for: "jsonl", "e2e", "classification" or "auto".

    "auto": `.csv`/`.tsv` are classification; `.txt` with `||` in its first line is E2E; JSONL is
    prompt/completion/text unless a classification keyword is passed or its first record has a
    `label` and no `prompt`/`text`. A file with no non-blank line is an error, in every format.
    """
    path = Path(path)
    first = next((line for _, line in _lines(path)), None)
    if first is None:
        raise ValueError(f"{path} is empty: it has no lines with data")
    if format == "auto":
        if path.suffix.lower() in (".csv", ".tsv") or kw.keys() - {"skip_bad_lines"}:
            format = "classification"
        elif first.lstrip().startswith("{"):
            keys = set(re.findall(r'"(\w+)"\s*:', first))  # enough to choose; the reader reports bad lines
            format = "classification" if "label" in keys and not keys & {"prompt", "text"} else "jsonl"
        elif "||" in first:
            format = "e2e"
        else:
            raise SettingError(f"cannot tell the format of {path} from its name or first line; set ",
                               Setting("format"), " to 'jsonl', 'e2e' or 'classification'")
    readers: dict[str, Callable[..., LoadResult[Any]]] = {
        "jsonl": read_jsonl, "e2e": read_e2e, "classification": read_classification}
    if format not in readers:
        raise ValueError(f"unknown format {format!r}; choose one of {['auto', *readers]}")
    return readers[format](path, **kw)


def read_references(path: str | Path, format: str = "auto", skip_bad_lines: bool = False) -> LoadResult[Any]:
    """The examples that `lorakit eval` scores: prompts with their references (JSONL prompt/completion,
    E2E `MR||reference`), or a classification file, as `load_examples` reads them. A JSONL "text"
    line has neither a prompt nor a reference: a file of only those is refused as a whole, naming
    the keys it needs; a few among prompt/completion lines are bad lines."""
    path = Path(path)
    result = load_examples(path, format, skip_bad_lines=skip_bad_lines)
    texts = sum(1 for ex in result if isinstance(ex, Example) and not ex.prompt)  # only read_jsonl makes them
    if not texts:
        return result
    if texts == len(result):
        raise ValueError(f'{path} has no prompt/reference fields: its lines hold only "text" (what `lorakit train` '
                         f'learns from as a whole); {_REFERENCE_LINES}')
    return _read_jsonl(path, skip_bad_lines, text_lines=False)  # again, to name (or skip) the "text" lines


@dataclass(frozen=True)
class PromptLine:
    """A prompt to generate from, with the line it came from and the adapter it names, if any."""

    prompt: str
    line: int
    adapter: str | None = None  # None with `names_adapter`: the base model
    names_adapter: bool = False  # the line has an "adapter" field


def read_prompts(path: str | Path, format: str = "auto", skip_bad_lines: bool = False) -> LoadResult[PromptLine]:
    """The prompts of a file for `lorakit generate`: JSONL lines with a string "prompt" (any
    "completion" is ignored) and optionally "adapter", the name of the adapter that line uses
    (null: the base model); or E2E lines `MR||reference`, whose MR is the prompt."""
    path = Path(path)
    first = next((line for _, line in _lines(path)), None)
    if first is None:
        raise ValueError(f"{path} is empty: it has no lines with data")
    if format == "e2e" or (format == "auto" and not first.lstrip().startswith("{")):
        examples = load_examples(path, format, skip_bad_lines=skip_bad_lines)
        result: LoadResult[PromptLine] = LoadResult(path)
        result.skipped = examples.skipped
        result.extend(PromptLine(ex.prompt, 0) for ex in examples)
        return result
    if format not in ("auto", "jsonl"):
        raise SettingError("prompts come from a JSONL or E2E file; ", Setting("format"), f" {format!r} holds none")
    result = LoadResult(path)
    for number, record in _json_records(result, skip_bad_lines):
        if not isinstance(record, dict):
            result._bad(number, f'expected a JSON object with a string "prompt"; got {_json_kind(record)}',
                        skip_bad_lines)
        elif "prompt" in record and not isinstance(record["prompt"], str):
            result._bad(number, f'"prompt" must be a string, got {_json_kind(record["prompt"])}', skip_bad_lines)
        elif "prompt" not in record:
            result._bad(number, f'expected an object with a string "prompt"; got keys {sorted(record)}',
                        skip_bad_lines)
        elif "adapter" in record and not (record["adapter"] is None or isinstance(record["adapter"], str)):
            result._bad(number, f'"adapter" must be an adapter\'s name or null (the base model), got '
                                f'{record["adapter"]!r}', skip_bad_lines)
        else:
            result.append(PromptLine(record["prompt"], number, record.get("adapter"), "adapter" in record))
    return result


def split_holdout(examples: Sequence[T], fraction: float = 0.05, seed: int = 0,
                  group_by: Callable[[T], Hashable] | None = None) -> tuple[list[T], list[T]]:
    """Deterministic (train, holdout) split; both keep the input order.

    `group_by` keeps groups whole, e.g. `lambda ex: ex.prompt` for E2E, where one MR has several
    references: otherwise the holdout would score references of MRs the model trained on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    keys = [group_by(ex) if group_by else i for i, ex in enumerate(examples)]
    groups = list(dict.fromkeys(keys))  # first-seen order, so the split does not depend on hashing
    n_hold = min(max(1, round(fraction * len(groups))), len(groups) - 1) if fraction > 0 and len(groups) > 1 else 0
    chosen = np.random.default_rng(seed).permutation(len(groups))[:n_hold]
    held = {groups[i] for i in chosen}
    train = [ex for ex, k in zip(examples, keys) if k not in held]
    return train, [ex for ex, k in zip(examples, keys) if k in held]


def _encode(ex: Example, tokenizer: PreTrainedTokenizerBase, chat_template: bool,
            separator: str) -> tuple[list[int], list[int]]:
    """Prompt and completion are tokenized apart, so the prompt mask is exact by construction and the
    prompt's ids are those that generation will start from."""
    prompt, completion, wrapped = ex.prompt + separator, ex.completion, chat_template and bool(ex.prompt)
    if not ex.prompt:  # a plain text example: no turn to wrap, loss on everything
        prompt = ""
    elif wrapped:
        if not getattr(tokenizer, "chat_template", None):
            raise SettingError(Setting("chat_template", True), " was given, but the tokenizer has no chat_template; "
                               "leave it out, or use a tokenizer that has one")
        user = [{"role": "user", "content": ex.prompt}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": ex.completion}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently with the assistant turn than with "
                             "add_generation_prompt=True, so the prompt cannot be masked exactly")
        completion = full[len(prompt):]
    # A chat template writes its own special tokens (BOS included, where it has one) as text.
    return (list(tokenizer(prompt, add_special_tokens=not wrapped)["input_ids"]),
            list(tokenizer(completion, add_special_tokens=False)["input_ids"]))


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, chat_template: bool = False,
                  separator: str = "\n") -> list[int]:
    """The prompt's ids exactly as `tokenize_example` puts them before the completion; generate from these."""
    return _encode(Example(prompt, ""), tokenizer, chat_template, separator)[0]


def tokenize_example(ex: Example, tokenizer: PreTrainedTokenizerBase, max_len: int, chat_template: bool = False,
                     separator: str = "\n") -> dict[str, list[int]]:
    """`input_ids` and `labels` (same length, unshifted as HF models expect); prompt labels are -100.

    Plain mode puts `separator` between prompt and completion. With `chat_template=True` the prompt
    is the user message and the completion the assistant message; labels cover the assistant
    part up to and including the template's end-of-turn token (anything the template writes after
    it, such as a newline, is dropped). The completion always ends with EOS, so the model learns
    to stop. Text examples (empty prompt) are never wrapped in a template.

    Too long: the prompt loses tokens from its start (keeping a leading BOS), so the completion
    stays whole when it fits in `max_len` - 1; a longer completion is cut at the end, after
    max_len // 2 prompt tokens at most, and then has no EOS.
    """
    _check_max_len(max_len)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one, so the model can learn where a completion ends")
    prompt_ids, completion_ids = _encode(ex, tokenizer, chat_template, separator)
    completion_ids = completion_ids[:completion_ids.index(eos) + 1] if eos in completion_ids else completion_ids + [eos]
    prompt_ids, completion_ids = _truncate(prompt_ids, completion_ids, max_len, tokenizer.bos_token_id)
    return {"input_ids": prompt_ids + completion_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids}


def _check_max_len(max_len: int) -> None:
    # A SettingError: the command line sets it as --seq-len. Two tokens: one to read and one to predict.
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 2:
        raise SettingError(Setting("max_len"), f" (the longest example, in tokens) must be at least 2, got {max_len!r}")


def _truncate(prompt: list[int], completion: list[int], max_len: int, bos: int | None) -> tuple[list[int], list[int]]:
    if len(prompt) + len(completion) <= max_len:
        return prompt, completion
    keep_bos = bool(prompt) and bos is not None and prompt[0] == bos
    head, body = prompt[:keep_bos], prompt[keep_bos:]
    room = max_len - len(completion) - len(head)  # prompt tokens that fit beside the whole completion
    if room < 1:  # the completion alone is too long: give the prompt half, cut the completion's end
        room = min(len(body), max(1, max_len // 2 - len(head)))
        completion = completion[:max_len - len(head) - room]
    return head + body[len(body) - room:], completion


def tokenize_classification(ex: ClassificationExample, tokenizer: PreTrainedTokenizerBase,
                            max_len: int) -> dict[str, Any]:
    """Encoder inputs (`[CLS] a [SEP] b [SEP]` for BERT) and `labels`, the int class, truncated longest-first."""
    _check_max_len(max_len)
    enc = tokenizer(ex.text, ex.text_pair, truncation=True, max_length=max_len)
    out: dict[str, Any] = {"input_ids": list(enc["input_ids"]), "labels": ex.label}
    if "token_type_ids" in enc:
        out["token_type_ids"] = list(enc["token_type_ids"])
    return out


# What each sequence key is padded with; any other list-valued key gets pad_id.
