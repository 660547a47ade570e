"""The stores' error boundary: a driver's exceptions become ours as they leave a store.

Input: a store class, the driver's base exception class, and a backend's converter
(the exception and the store → our :class:`~newsletter.errors.StorageError`, or None
for a query's bug). Output: the class with every public method, generators too,
raising our error from the driver's; a bug keeps its own exception and traceback.
Each backend's ``translated`` decorator is this with its own driver and converter.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

from newsletter.errors import StorageError

T = TypeVar("T")
Convert = Callable[[Any, object], StorageError | None]


def translate_class(cls: type[T], catch: type[Exception], convert: Convert) -> type[T]:
    """Wrap every public method of ``cls`` so that ``catch`` leaves it as ``convert`` says:
    its own, and those of a base that says ``BACKEND_NEUTRAL = True`` (a mixin of the
    same SQL for both backends, such as storage.feedback_reads), wrapped on ``cls`` with
    this backend's converter. Other bases are left as they are."""
    own = dict(vars(cls))  # before any wrapping lands on the class
    methods: dict[str, Callable[..., Any]] = {}
    for klass in reversed(cls.__mro__):  # the nearest definition last, so it wins
        if klass is cls or vars(klass).get("BACKEND_NEUTRAL"):
            found = own if klass is cls else vars(klass)
            for name, member in found.items():
                if not name.startswith("_") and inspect.isfunction(member):
                    methods[name] = member
    for name, member in methods.items():
        setattr(cls, name, _translating(member, catch, convert))
    return cls


def _translating(
    method: Callable[..., Any], catch: type[Exception], convert: Convert
) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: object, *args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from method(self, *args, **kwargs)
            except catch as exc:
                _reraise(exc, self, convert)

        return stream

    @functools.wraps(method)
    def call(self: object, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except catch as exc:
            _reraise(exc, self, convert)

    return call


def _reraise(exc: Exception, store: object, convert: Convert) -> NoReturn:
    """Raise our StorageError for ``exc`` (from it), or ``exc`` itself for a query's bug."""
    ours = convert(exc, store)
    if ours is None:
        raise exc
    raise ours from exc
