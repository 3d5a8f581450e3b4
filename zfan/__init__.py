"""zfan: brokerless fan-in / fan-out over ZeroMQ, with a SQLite ledger so nothing is lost."""

__version__ = "0.1.0"  # first: the modules imported below report it


from .aio import AsyncProducer, AsyncSubscriber
from .config import Curve, ProducerSettings, SinkSettings, SubscriberSettings, Timing, WorkerSettings
from .delivery import BatchOutcome, Outcomes
from .errors import (
    AppError,
    AuthError,
    BindError,
    Closed,
    ConfigError,
    DeliveryTimeout,
    LedgerError,
    NoSink,
    OutcomeTimeout,
    ProtocolError,
    SerializationError,
    ZfanError,
)
from .nodes.dead import dead_letters, purge_dead_letters, requeue_dead_letters, show_dead_letter
from .nodes.producer import Producer
from .nodes.sink import Sink
from .nodes.status import query_status
from .nodes.subscriber import Subscriber
from .nodes.worker import Worker
from .routing import RetryPolicy
from .sequencing import RetentionGap
from .subscription import Message

__all__ = [
    # roles
    "Producer",
    "Sink",
    "Worker",
    "Subscriber",
    "Message",
    "BatchOutcome",
    # the same roles for asyncio
    "AsyncProducer",
    "AsyncSubscriber",
    "Outcomes",
    "query_status",
    # dead letters
    "dead_letters",
    "show_dead_letter",
    "requeue_dead_letters",
    "purge_dead_letters",
    # settings
    "SinkSettings",
    "WorkerSettings",
    "ProducerSettings",
    "SubscriberSettings",
    "Timing",
    "Curve",
    "RetryPolicy",
    # errors
    "ZfanError",
    "ConfigError",
    "BindError",
    "LedgerError",
    "AppError",
    "AuthError",
    "ProtocolError",
    "SerializationError",
    "DeliveryTimeout",
    "OutcomeTimeout",
    "NoSink",
    "Closed",
    "RetentionGap",
]
