"""Domain errors. No grpc import: the server interceptor maps each class to a status code."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of errors whose message is safe to show to the caller."""


class InvalidInput(ServiceError):
    """The request is malformed or breaks a documented limit (INVALID_ARGUMENT)."""


class NotReady(ServiceError):
    """The service cannot answer yet or a dependency is away (UNAVAILABLE)."""


class PreconditionFailed(ServiceError):
    """The system is not in the state the operation needs, e.g. a model not loaded, a rollout
    already running, model control without a state file (FAILED_PRECONDITION)."""


class ModelMismatch(PreconditionFailed):
    """Embeddings of two different model fingerprints were combined (FAILED_PRECONDITION)."""


class Overloaded(ServiceError):
    """A bounded queue is full; the caller should back off and retry (RESOURCE_EXHAUSTED)."""


class DeadlineExpired(ServiceError):
    """The request's deadline passed before it was computed (DEADLINE_EXCEEDED)."""


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or does not match the model (raised at load, not per request)."""


class DeviceUnavailable(CheckpointError):
    """The device asked for (--device cuda or cuda:N) is not there, so no model can be loaded on it
    (raised at start-up, by shared/device.py)."""


class StorageFull(Overloaded):
    """A durable write failed for lack of space (disk full, file size limit); nothing was applied, and
    the same write may succeed once space is freed (RESOURCE_EXHAUSTED)."""


class StorageUnavailable(NotReady):
    """A durable write failed (I/O error, failed fsync); nothing was applied, reads still work
    (UNAVAILABLE)."""
