"""``docs/support-matrix.md``, rendered from the support table (``megacore.config.support.RULES``):
the matrix of layouts and features by model kind, then every refused combination, requirement,
divisibility rule and other check. ``tests/test_support_matrix.py`` keeps the committed file equal
to ``render_markdown()``."""

from __future__ import annotations

from megacore.config.support import (FEATURES, MATRIX_COLUMNS, MATRIX_ROWS, RULES, Check, Divisible, Requires,
                                     Unsupported)


def _cell(row: str, column: str) -> str:
    """'yes', or 'no (R<n>)' naming the refusal of this pair, or of a feature either one implies
    (sequence parallelism is refused wherever tensor parallelism is)."""
    refusals = [r for r in RULES if isinstance(r, Unsupported)]
    for key in (row, *FEATURES[row].implies):
        for col in (column, *FEATURES[column].implies):
            for n, rule in enumerate(refusals, 1):
                if {rule.a, rule.b} == {key, col}:
                    return f"no (R{n})"
    return "yes"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


REGENERATE = ("python -c \"from megacore.config.support_doc import render_markdown; print(render_markdown(), end='')\" "
              "> docs/support-matrix.md")


def render_markdown() -> str:
    """``docs/support-matrix.md``, from ``RULES`` (regenerate it with ``REGENERATE``)."""
    refusals = [r for r in RULES if isinstance(r, Unsupported)]
    out = ["# Support matrix", "",
           "<!-- Generated from megacore/config/support.py (RULES) by megacore/config/support_doc.py; do not edit "
           f"by hand. Regenerate: {REGENERATE} -->", "",
           "Which layouts, features and model kinds run together. `RunConfig.validate(world_size)` (run by "
           "`megacore train`) checks every row below and refuses a run with one error that "
           "names the field, the value and the fix.", "",
           "## Layouts and features by model kind", "",
           "Columns are not exclusive (a hybrid stack may have MoE layers; Mamba layers are a hybrid stack). "
           "\"no (R*n*)\" points to the refused combination below.", ""]
    out += _table(("", *(FEATURES[c].label for c in MATRIX_COLUMNS)),
                  [(FEATURES[r].label, *(_cell(r, c) for c in MATRIX_COLUMNS)) for r in MATRIX_ROWS])
    out += ["", "## Refused combinations", ""]
    out += _table(("", "combination", "why", "fix"), [(f"R{n}", *r.doc_row()) for n, r in enumerate(refusals, 1)])
    out += ["", "## Requirements", ""]
    out += _table(("setting", "needs", "fix"), [r.doc_row() for r in RULES if isinstance(r, Requires)])
    out += ["", "## Sizes that must divide", ""]
    out += _table(("value", "must be divisible by", "when"), [r.doc_row() for r in RULES if isinstance(r, Divisible)])
    out += ["", "## Other checks", ""]
    out += _table(("check", "topic"), [(r.doc, r.topic) for r in RULES if isinstance(r, Check)])
    return "\n".join(out) + "\n"
