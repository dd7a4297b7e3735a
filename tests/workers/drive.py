"""Reading an engine's outputs the way production does: from what `step()` returns."""

from workers.protocol import RequestOutput


def collect(outputs: list[RequestOutput], into: dict[str, list[RequestOutput]]) -> dict[str, list[RequestOutput]]:
    for out in outputs:
        into.setdefault(out.request_id, []).append(out)
    return into


def run_all(eng, into: dict[str, list[RequestOutput]] | None = None) -> dict[str, list[RequestOutput]]:
    """Step until the engine has nothing to do; every output by request id (with those already in `into`)."""
    into = {} if into is None else into
    while eng.has_work():
        collect(eng.step(), into)
    return into


def token_ids(outs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for o in outs if o.index == index for t in o.new_token_ids]
