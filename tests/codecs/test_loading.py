"""mctp.codecs._loading: the release-folder check the adapters' ``from_pretrained`` share."""

from __future__ import annotations

from pathlib import Path

import pytest

from mctp.codecs._loading import release_folder


def test_release_folder(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("x: 1")
    (tmp_path / "sub").mkdir()
    assert release_folder(str(tmp_path), "Demo") == tmp_path
    assert release_folder(tmp_path, "Demo", ("config.yaml",)) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"Demo folder not found: .*absent"):
        release_folder(tmp_path / "absent", "Demo", ("config.yaml",))
    with pytest.raises(FileNotFoundError, match="Demo folder not found"):
        release_folder(tmp_path / "config.yaml", "Demo")  # a file, not a folder
    # every absent file is named; a folder with the file's name does not count
    with pytest.raises(FileNotFoundError, match=r"lacks \['sub', 'flow\.pt'\]"):
        release_folder(tmp_path, "Demo", ("config.yaml", "sub", "flow.pt"))
