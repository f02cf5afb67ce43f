"""Caption TSVs saved with a UTF-8 byte-order mark (Excel, Notepad) read like any other."""

from __future__ import annotations

from pathlib import Path

from clipdiff.data.captions import read_caption_table


def test_a_bom_is_not_part_of_the_header(tmp_path: Path):
    plain, bom = tmp_path / "plain.tsv", tmp_path / "bom.tsv"
    text = "object_id\tcaption\na1\ta red car\na2\ta blue car\n"
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_caption_table(bom) == read_caption_table(plain) == {"a1": ("a red car", None), "a2": ("a blue car", None)}
