"""The package's one text -> bool / int / float rule (``_parse``) and ``config_utils.parse_arg``."""

import math

import pytest

from sslbench_jax import _parse
from sslbench_jax import config_utils


@pytest.mark.parametrize("text,want", [
    ("true", True), ("True", True), ("TRUE", True), (" 1 ", True), (True, True),
    ("false", False), ("False", False), ("fAlSe", False), ("0", False), (False, False)])
def test_parse_bool_words(text, want):
  assert _parse.parse_bool(text, "x") is want


@pytest.mark.parametrize("text", ["maybe", "", "yes!", "2", "t", 1, 0, None, 1.0])
def test_parse_bool_refuses(text):
  with pytest.raises(ValueError, match=r"^flag z=.* is not a boolean \(one of true, 1, false, 0\)$"):
    _parse.parse_bool(text, "flag z")


@pytest.mark.parametrize("text", ["0", "-7", " 42 ", "+3", "1000000000000000000000", 5, -1])
def test_parse_int_is_pythons_int(text):
  got = _parse.parse_int(text, "n")
  assert got == int(text) and type(got) is int


@pytest.mark.parametrize("text", ["1.0", "1e3", "three", "", True, 2.0, None])
def test_parse_int_refuses(text):
  with pytest.raises(ValueError, match=r"^--n=.* is not an integer$"):
    _parse.parse_int(text, "--n")


@pytest.mark.parametrize("text", ["0.4", "1e-4", "-2", " 3.5 ", "7", 2, 0.25])
def test_parse_float_is_pythons_float(text):
  got = _parse.parse_float(text, "lr")
  assert got == float(text) and type(got) is float


def test_parse_float_refuses():
  for text in ("x", "", "0.4.1", True, None):
    with pytest.raises(ValueError, match=r"^lr=.* is not a number$"):
      _parse.parse_float(text, "lr")
  for text in ("nan", "inf", "-Infinity", math.inf):
    with pytest.raises(ValueError, match="is not a finite number"):
      _parse.parse_float(text, "lr")
    assert not math.isfinite(_parse.parse_float(text, "lr", finite=False))


def test_config_parse_arg_types_and_errors():
  c = config_utils.parse_arg("tiny,n=3,lr=0.5,name=abc,extra=7,off=FALSE",
                             tiny=False, n=1, lr=0.1, name="x", extra=None, off=True)
  assert dict(c) == {"tiny": True, "n": 3, "lr": 0.5, "name": "abc", "extra": 7,
                     "off": False}
  assert type(c.n) is int and type(c.lr) is float
  assert dict(config_utils.parse_arg(None, n=1)) == {"n": 1}
  assert config_utils.parse_arg("word=hello", word=None).word == "hello"
  for arg, message in [("tiny=maybe", "config argument tiny='maybe' is not a boolean"),
                       ("n=3.5", "config argument n='3.5' is not an integer"),
                       ("lr=fast", "config argument lr='fast' is not a number"),
                       ("lr=nan", "config argument lr='nan' is not a finite number"),
                       ("bogus=1", "unknown config argument 'bogus'"),
                       ("n=1,n=2", "'n' is given twice"),
                       ("n", "needs a value")]:
    with pytest.raises(ValueError, match=message):
      config_utils.parse_arg(arg, tiny=False, n=1, lr=0.1)


def test_config_utils_parse_bool_is_the_shared_one():
  assert config_utils.parse_bool is _parse.parse_bool
