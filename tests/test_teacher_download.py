"""Teacher weights without network (rankkd.models.imagenet.load_teacher): the URL, the cause, and how to pass a
file instead."""
import re
import socket
import urllib.error

import pytest
import torch

from rankkd import models

# ---------------------------------------------------------------------------------------------------------------------
# Teacher weights without network: the URL, the cause, and how to pass a file instead.


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """torch.hub's downloads raise `error` (set by the test); its cache is an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    failure = {}

    def download(url, destination, *args, **kwargs):
        raise failure["error"]

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return failure


@pytest.mark.parametrize("error, cause", [
    (urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")),
     r"\[Errno -3\] Temporary failure in name resolution"),
    (urllib.error.HTTPError("https://x", 403, "Forbidden", None, None), "HTTP Error 403: Forbidden"),
    (TimeoutError("timed out"), "timed out"),
])
def test_teacher_download_failure_names_url_and_the_local_file_way(tmp_path, no_network, error, cause):
    import torchvision

    no_network["error"] = error
    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    file_name = entry.url.rsplit("/", 1)[1]
    with pytest.raises(ValueError) as refused:
        models.load_teacher("resnet18", "IMAGENET1K_V1", 1000)
    message = str(refused.value)
    assert message.startswith(f"cannot download torchvision weights {entry} from {entry.url}: ")
    assert re.search(cause, message) and "\n" not in message
    assert f"--teacher-weights /path/to/{file_name}" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / file_name) in message

    # The way out that the message gives: the same file, fetched elsewhere, passed by path.
    fetched = models.build_model("resnet18", 1000).state_dict()
    torch.save(fetched, tmp_path / file_name)
    teacher = models.load_teacher("resnet18", str(tmp_path / file_name), 1000)
    assert all(torch.equal(teacher.state_dict()[key], value) for key, value in fetched.items())


def test_unreadable_earlier_download_is_named(tmp_path, no_network):
    import torchvision

    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / entry.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"layer.weight": torch.randn(5, 3)}, cached)
    cached.write_bytes(cached.read_bytes()[:300])  # a download cut short
    with pytest.raises(ValueError, match=f"the copy downloaded before, {cached}, can't be read .*delete it"):
        models.load_teacher("resnet18", "IMAGENET1K_V1", 1000)
