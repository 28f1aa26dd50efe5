import asyncio


async def slow_add(a, b):
    await asyncio.sleep(0.01)
    return a + b


async def gather_sum(values):
    results = await asyncio.gather(*(slow_add(v, 0) for v in values))
    return sum(results)
