"""Where the tests find the repository and what lies beside it, wherever a test file sits under tests/."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"
SHARED = REPO.parent / "shared"      # ../shared beside the clone (CI lays it there; absent on a user's machine)
