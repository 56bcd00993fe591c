"""One class list, from training, everywhere: the model's labels and how another json's categories map to them.

The training json defines the classes: its categories sorted by id give the labels 0..C-1 (names, ids,
label order). The checkpoint stores that list; every other json (val, --test-only, tools/infer.py,
export metadata) is matched to it **by name**, never by id or position:

- permuted or renumbered ids map to the training label of the same name;
- a name that differs only in case matches, with a warning;
- a category of the other json that training does not know is reported with its box count and left out
  of the targets and of the AP (``not_trained``), never shifting another class;
- a training class the other json lacks is listed (``missing``); its detections cannot be scored there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

from src.core.yaml_utils import DataError

logger = logging.getLogger(__name__)

__all__ = ["ClassList", "ClassMatch", "ClassMismatchError", "match_classes"]


class ClassMismatchError(DataError):
    """Two class lists that cannot be matched (duplicate names, nothing in common, a checkpoint trained on
    other classes than the json); the message names both sides."""


@dataclass(frozen=True)
class ClassList:
    """The model's classes: label i is `names[i]`, category `category_ids[i]` of the training json."""
    names: Tuple[str, ...]
    category_ids: Tuple[int, ...]

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping], where: str = "the training json") -> "ClassList":
        """Labels in sorted category-id order (as the dataset assigns them); names must be unique."""
        cats = sorted(categories, key=lambda c: int(c["id"]))
        names = tuple(str(c.get("name", c["id"])) for c in cats)
        _check_unique(names, where)
        return cls(names, tuple(int(c["id"]) for c in cats))

    @classmethod
    def from_records(cls, records: Sequence[Mapping]) -> "ClassList":
        """From `to_records()` (the checkpoint's 'classes')."""
        rows = sorted(records, key=lambda r: int(r["label"]))
        if [int(r["label"]) for r in rows] != list(range(len(rows))):
            raise ClassMismatchError(f"class records {list(records)!r} do not give labels 0..{len(rows) - 1}")
        return cls(tuple(str(r["name"]) for r in rows), tuple(int(r["category_id"]) for r in rows))

    def to_records(self) -> List[dict]:
        """[{label, name, category_id}] (plain types: stored in checkpoints and eval jsons)."""
        return [{"label": i, "name": n, "category_id": c} for i, (n, c) in enumerate(zip(self.names, self.category_ids))]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class ClassMatch:
    """How the categories of one json map to the training labels.

    label_to_category_id: training label -> category id in that json (matched classes only).
    not_trained: [{category_id, name, num_boxes}] of that json's categories training does not know.
    missing: [{label, name}] of training classes absent from that json.
    case_only: [(training name, json name)] matched ignoring case.
    """
    label_to_category_id: Dict[int, int]
    not_trained: List[dict] = field(default_factory=list)
    missing: List[dict] = field(default_factory=list)
    case_only: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def category_id_to_label(self) -> Dict[int, int]:
        return {c: lab for lab, c in self.label_to_category_id.items()}

    def records(self, classes: ClassList) -> List[dict]:
        """The mapping used, for the eval json: [{label, name, category_id}], category_id in the evaluated
        json (matched training classes only, in label order)."""
        return [{"label": lab, "name": classes.names[lab], "category_id": cid}
                for lab, cid in sorted(self.label_to_category_id.items())]

    def report(self, where: str) -> List[str]:
        """One line per thing a user should know (empty when the json's classes equal training's)."""
        lines = [f"{where}: category {j!r} matched training class {t!r} ignoring case" for t, j in self.case_only]
        lines += [f"{where}: category {c['name']!r} (id {c['category_id']}, {c['num_boxes']} boxes) is not a training "
                  f"class: not trained, its boxes are left out of the targets and the AP" for c in self.not_trained]
        lines += [f"{where}: training class {m['name']!r} (label {m['label']}) has no category here: its detections "
                  f"cannot be scored on this json" for m in self.missing]
        return lines


def _check_unique(names: Sequence[str], where: str) -> None:
    folded: Dict[str, str] = {}
    for name in names:
        key = name.casefold()
        if key in folded:
            raise ClassMismatchError(f"{where}: category names {folded[key]!r} and {name!r} are the same class "
                                     f"name (ignoring case); classes are matched by name, so names must be unique")
        folded[key] = name


def match_classes(classes: ClassList, categories: Sequence[Mapping], box_counts: Mapping[int, int] | None = None,
                  where: str = "the json") -> ClassMatch:
    """Match a json's categories to the training classes by name (exact, else ignoring case).

    box_counts: category id -> number of boxes in that json (for the report). Raises ClassMismatchError
    when the json's names repeat, or when no class matches at all (a json of another data set).
    """
    box_counts = box_counts or {}
    cats = [(int(c["id"]), str(c.get("name", c["id"]))) for c in categories]
    _check_unique([n for _, n in cats], where)
    exact = {n: i for i, n in enumerate(classes.names)}
    folded = {n.casefold(): i for i, n in enumerate(classes.names)}
    match = ClassMatch({})
    for cid, name in cats:
        label = exact.get(name)
        if label is None and name.casefold() in folded:
            label = folded[name.casefold()]
            match.case_only.append((classes.names[label], name))
        if label is None:
            match.not_trained.append({"category_id": cid, "name": name, "num_boxes": int(box_counts.get(cid, 0))})
        else:
            match.label_to_category_id[label] = cid
    match.missing = [{"label": i, "name": n} for i, n in enumerate(classes.names) if i not in match.label_to_category_id]
    if not match.label_to_category_id and cats:
        raise ClassMismatchError(f"{where}: none of its categories {[n for _, n in cats]} is a training class "
                                 f"{list(classes.names)}; is it a json of another data set?")
    return match
