"""One list of image file endings, torchvision ImageFolder's, for every folder reader."""

import os

import numpy as np
from PIL import Image
import pytest

from sslbench_jax.data import folder_source
from sslbench_jax.features import image_folder

# torchvision.datasets.folder.IMG_EXTENSIONS (torchvision 0.15 - 0.2x), written
# out here because torchvision is not installed for the tests.
TORCHVISION_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm",
                              ".tif", ".tiff", ".webp")
# Endings torchvision's ImageFolder skips (.gif included: it is not in its list).
NOT_IMAGES = (".gif", ".txt", ".npy", ".json", ".jpg.part", ".svg")


def _reference():
  try:
    from torchvision.datasets import folder  # pylint: disable=g-import-not-at-top
  except ImportError:
    return TORCHVISION_IMG_EXTENSIONS
  return folder.IMG_EXTENSIONS


def _write(path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")


def test_extension_list_is_torchvisions():
  assert sorted(folder_source.IMAGE_EXTENSIONS) == sorted(_reference())


def test_is_image_file_any_case():
  for ext in _reference():
    for name in (f"a{ext}", f"a{ext.upper()}", f"a.b{ext.title()}"):
      assert folder_source.is_image_file(name), name
  for ext in NOT_IMAGES:
    assert not folder_source.is_image_file(f"a{ext}"), ext
  assert not folder_source.is_image_file("jpg")


@pytest.fixture
def mixed_folder(tmp_path):
  """root/<cls>/ with one file of every accepted ending (mixed case) and of every rejected one."""
  expected = []
  for c in ("cat", "dog"):
    os.makedirs(tmp_path / c)
    for i, ext in enumerate(_reference()):
      name = f"{i:02d}{ext.upper() if i % 2 else ext}"
      _write(tmp_path / c / name)
      expected.append(f"{c}/{name}")
    for ext in NOT_IMAGES:
      _write(tmp_path / c / f"x{ext}")
  return tmp_path, sorted(expected)


def test_folder_source_lists_exactly_the_accepted_endings(mixed_folder):
  root, expected = mixed_folder
  src = folder_source.FolderSource(str(root))
  got = [src.read(i)[2].replace(os.sep, "/") for i in range(len(src))]
  assert got == expected
  assert [src.read(i)[1] for i in range(len(src))] == [
      0 if e.startswith("cat/") else 1 for e in expected]


def test_features_image_folder_uses_the_same_list(mixed_folder):
  root, expected = mixed_folder
  folder = image_folder.ImageFolder(str(root))
  assert [f.replace(os.sep, "/") for f in folder.files] == expected


def test_only_rejected_endings_is_an_error_naming_the_folder(tmp_path):
  _write(tmp_path / "a.gif")
  with pytest.raises(ValueError, match=str(tmp_path)):
    image_folder.ImageFolder(str(tmp_path))
  os.makedirs(tmp_path / "cls")
  _write(tmp_path / "cls" / "b.gif")
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    folder_source.FolderSource(str(tmp_path))
