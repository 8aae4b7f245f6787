"""A --middleware target for the server tests: marks every response."""


async def add_header(request, call_next):
    response = await call_next(request)
    response.headers["x-fastllm-middleware"] = "on"
    return response
