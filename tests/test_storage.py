"""``storage.local_copy_dir`` and the ``storage.download_dir`` under it: the one way a remote
model folder reaches local disk (the pipeline's tokenizer and the training workers use the
temporary copy; ``models.resolve_model_source``'s cached copy is tested in test_models.py)."""

from __future__ import annotations

import os
import uuid

import pytest

from tripost_ray import storage


def test_local_folder_is_used_in_place(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with storage.local_copy_dir(f"file://{tmp_path}") as local:
        assert local == str(tmp_path)
    assert (tmp_path / "config.json").exists()


def test_remote_folder_is_copied_and_the_copy_removed_after_the_block():
    url = f"memory://models/{uuid.uuid4().hex}"
    storage.write_text_atomic(storage.join(url, "config.json"), '{"a": 1}')
    storage.write_text_atomic(storage.join(url, "sub", "tokenizer.json"), "tok")
    with storage.local_copy_dir(url) as local:
        assert open(os.path.join(local, "config.json")).read() == '{"a": 1}'
        assert open(os.path.join(local, "sub", "tokenizer.json")).read() == "tok"
    assert not os.path.exists(local)


@pytest.mark.parametrize("url", ["memory://models/absent", "{tmp}/absent"])
def test_missing_folder_names_what_was_looked_for(url, tmp_path):
    url = url.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"init model folder not found: {url}"):
        with storage.local_copy_dir(url, what="init model folder"):
            pass
