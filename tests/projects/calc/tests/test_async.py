import pytest

from calc import aio


@pytest.mark.asyncio
async def test_gather_sum():
    assert await aio.gather_sum([1, 2, 3]) == 6
