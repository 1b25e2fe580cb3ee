"""With MST_REQUIRE_TORCH=1 (scripts/test sets it when it installed the pinned stack), a
missing torch or transformers is an error, not a reason to skip the torch tests."""

import os

if os.environ.get("MST_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401
    import transformers  # noqa: F401
