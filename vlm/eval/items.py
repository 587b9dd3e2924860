"""What `vlm eval` asks and what it expects: evaluation items from any data file the readers read.

    items = read_items("eval.json", metric="vqa", image_folder="images", references_field="answers")

Each canonical sample (`vlm.data.formats.read_source`: LLaVA JSON, QA tables, ... detected or `data_format`)
becomes one `EvalItem`:
- the prompt: the conversation up to its last user turn (earlier turns are context), checked by the one
  validator (`vlm.data.sample.validate_messages`, as a generation prompt);
- the references: with `references_field`, the record's field of that name (kept in the sample's `meta`):
  a list of strings (VQA's ten answers, several captions) or of `{"answer": ...}` objects (VQA v2 tables),
  a JSON list written as a string (CSV cells), or one string or number; without it, the sample's final
  assistant reply;
- for `choice`, the options: the record's fields named by one capital letter (`A`, `B`, ... as MMBench's
  tables have them), else the question's "A. text" lines (`vlm.eval.metrics.choice.parse_options`);
- `question_type`: the record's `question_type` field when it has one (scores per type in metrics.json).
For `caption`, samples with the same images and the same prompt are one item whose references are all their
answers: a COCO file with five captions per image (read as five samples) is scored as one prediction per
image against five references.

A record that cannot be evaluated (unreadable, no answer and no references field, a references field it lacks,
an unsafe or missing image) is a UserError naming the file, the first such record (index and id) and how many
there are, before any model is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.data.errors import SampleError
from vlm.data.formats import read_source
from vlm.data.paths import ImageFolder
from vlm.data.sample import is_embedded, validate_messages
from vlm.errors import UserError
from vlm.eval.metrics import check_metric
from vlm.eval.metrics.choice import parse_options, reference_letter

# a reader's SampleError detail starts with "<file name> record <i>: "; the message here names both itself
_READER_PREFIX = re.compile(r"^\S+ (record|line) \d+: ")
_LETTER = re.compile(r"^[A-Z]$")
# VQA accuracy with fewer annotators cannot give a right answer 1.0 (3 others must agree with it)
MIN_VQA_REFERENCES = 4


@dataclass
class EvalItem:
    """One question to answer and what a right answer is."""

    id: str
    messages: list[dict]  # ends with the user turn to answer
    images: list[Any]  # as the sample lists them: relative paths or embedded images
    references: list[str]
    options: dict[str, str] | None = None  # choice: {letter: text}
    question_type: str | None = None
    ids: list[str] = field(default_factory=list)  # caption: the ids of the samples merged into this item

    @property
    def question(self) -> str:
        return self.messages[-1]["content"].replace("<image>", "").strip()


def read_items(data_path: str | Path, *, metric: str, image_folder: str | None = None,
               references_field: str | None = None, data_format: str = "auto",
               reader_options: dict[str, Any] | None = None) -> list[EvalItem]:
    """The evaluation items of `data_path` (module docstring); UserError for the first bad record.
    `reader_options` go to the reader (`read_source`: e.g. `question_column` for QA tables)."""
    check_metric(metric)
    folder = ImageFolder(image_folder)
    items: list[EvalItem] = []
    bad: list[tuple[int, str | None, str]] = []
    for index, sample in enumerate(read_source(data_path, format=data_format, **(reader_options or {}))):
        try:
            if isinstance(sample, SampleError):
                raise sample
            items.append(eval_item(sample, index, metric, folder, references_field))
        except SampleError as exc:
            detail = _READER_PREFIX.sub("", exc.detail)
            bad.append((index, exc.sample_id or (sample.get("id") if isinstance(sample, dict) else None),
                        f"{exc.reason}: {detail}" if exc.reason in ("unsafe_path", "missing_image") else detail))
    if bad:
        index, sample_id, problem = bad[0]
        more = f" ({len(bad) - 1} more bad record(s))" if len(bad) > 1 else ""
        raise UserError(f"--data_path {data_path} record {index} (0-based, id {sample_id!r}): {problem}{more}; fix or "
                        "remove it (`vlm data check` lists unreadable ones)")
    if not items:
        raise UserError(f"--data_path {data_path} holds no records to evaluate")
    return merge_captions(items) if metric == "caption" else items


def eval_item(sample: dict, index: int, metric: str, folder: ImageFolder, references_field: str | None) -> EvalItem:
    """One canonical sample (`meta` kept) as an item, as `read_items` makes each (also used by training-time
    evaluation, `vlm.train.evaluation`); a SampleError when it cannot be evaluated."""
    messages = list(sample["messages"])
    answer = None
    if messages and messages[-1].get("role") == "assistant":
        answer = messages.pop()["content"]
    sample_id = sample["id"]
    messages = validate_messages(messages, for_generation=True, index=index, sample_id=sample_id)
    meta = sample.get("meta") or {}
    references = _references(meta, answer, references_field, index, sample_id)
    if metric == "vqa" and len(references) < MIN_VQA_REFERENCES:
        raise SampleError("bad_schema", f"{len(references)} reference answer(s); VQA accuracy scores an answer against "
                          f"the annotators' answers (10 in VQA v2, at least {MIN_VQA_REFERENCES} for a right answer "
                          "to score 1.0): give them with --references_field FIELD, or use --metric exact",
                          index=index, sample_id=sample_id)
    for image in sample["images"]:
        if not is_embedded(image):
            folder.resolve(image)
    item = EvalItem(sample_id, messages, list(sample["images"]), references,
                    question_type=str(meta["question_type"]) if "question_type" in meta else None, ids=[sample_id])
    if metric == "choice":
        item.options = _options(meta, item.question)
        for reference in references:
            if reference_letter(reference, item.options) is None:
                raise SampleError("bad_schema", f"reference {reference!r} is neither an option letter nor the text of one "
                                  f"of its options ({item.options or 'none found: give fields A, B, ... or A. lines'})",
                                  index=index, sample_id=sample_id)
    return item


def _references(meta: dict, answer: str | None, references_field: str | None, index: int, sample_id: str) -> list[str]:
    def fail(detail: str) -> SampleError:
        return SampleError("bad_schema", detail, index=index, sample_id=sample_id)

    if references_field is None:
        if answer is None or not answer.strip():
            raise fail("no answer to compare with: the conversation does not end with an assistant reply; add the "
                       "reply, or name the field holding the reference answers with --references_field")
        return [answer]
    if references_field not in meta:
        raise fail(f"no field {references_field!r} (--references_field); the record's other fields: {sorted(meta)[:12]}")
    value = meta[references_field]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    values = value if isinstance(value, list) else [value]
    # VQA v2 as tables store it: [{"answer": "2", "answer_confidence": "yes", "answer_id": 1}, ...]
    values = [v.get("answer") if isinstance(v, dict) else v for v in values]
    references = [str(v) for v in values if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip()]
    if not references or len(references) != len(values):
        raise fail(f"field {references_field!r} (--references_field) must hold answers (strings or numbers), "
                   f"got {value!r:.100}")
    return references


def _options(meta: dict, question: str) -> dict[str, str]:
    fields = {k: str(v) for k, v in sorted(meta.items())
              if _LETTER.match(k) and isinstance(v, (str, int, float)) and str(v).strip() and str(v) != "nan"}
    return fields or parse_options(question)


def merge_captions(items: list[EvalItem]) -> list[EvalItem]:
    """Items with the same images and prompt as one item with all their references (first id kept)."""
    merged: dict[str, EvalItem] = {}
    for item in items:
        key = json.dumps([item.images, item.messages], sort_keys=True, default=str)
        if key in merged:
            merged[key].references.extend(item.references)
            merged[key].ids.extend(item.ids)
        else:
            merged[key] = item
    return list(merged.values())
