import pytest


@pytest.fixture(params=["t5", "gpt2"])
def arch(request) -> str:
    return request.param
