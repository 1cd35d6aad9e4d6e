"""The files shipped under data/quickstart are exactly what the repo's generators produce."""

import json
import subprocess
import sys

from conftest import REPO
from eaft_pl.models.char_tokenizer import build_char_tokenizer

SHIPPED = REPO / "data" / "quickstart"


def test_shipped_tokenizer_is_the_built_one(tmp_path):
    build_char_tokenizer().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / name).read_text() == (SHIPPED / "tokenizer" / name).read_text(), name
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == json.loads(
        (SHIPPED / "tokenizer" / "tokenizer_config.json").read_text()
    )


def test_shipped_chat_data_is_the_generated_one(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_quickstart_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in ("train", "val"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (SHIPPED / f"{split}.jsonl").read_bytes(), split
