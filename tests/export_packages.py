"""The packages the export tests need: the `export` extra (onnx, onnxscript, onnxruntime, openvino), which the `test`
extra installs, so that these tests run wherever the tests run.

A missing one is an incomplete installation, not a reason to skip silently: `export_tests_mark()` raises
`ImportError` naming the packages and the install command, so that the test modules using it fail to collect and
pytest reports the error. Set CRANE_HF_SKIP_EXPORT_TESTS=1 to skip those tests instead, each skip naming the
packages (`pytest -ra` lists them).
"""

from __future__ import annotations

import os

import pytest

from crane_hf.export.packages import REQUIREMENTS, missing_packages

SKIP_VARIABLE = "CRANE_HF_SKIP_EXPORT_TESTS"


def export_tests_mark() -> pytest.MarkDecorator:
    """The mark of a test that exports or runs an exported graph (see the module docstring).

    Raises:
        ImportError: a package is missing and CRANE_HF_SKIP_EXPORT_TESTS is not 1.
    """
    missing = sorted({name for step in REQUIREMENTS for name in missing_packages(step)})
    if not missing:
        return pytest.mark.skipif(False, reason="the export packages are installed")
    message = f"the export tests need {', '.join(missing)}, which the test extra installs: pip install -e '.[test]'"
    if os.environ.get(SKIP_VARIABLE) == "1":
        return pytest.mark.skip(reason=f"{message} ({SKIP_VARIABLE}=1)")
    raise ImportError(f"{message} (or set {SKIP_VARIABLE}=1 to skip these tests)")
