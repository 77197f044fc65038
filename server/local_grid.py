"""An in-process Flower runtime: a ``Grid`` that delivers each message to a real ClientApp in this process.

No SuperLink, no SuperNode, no Ray: ``LocalGrid(client_app, {node_id: node_config})`` gives every node its
own :class:`flwr.app.Context` (node config, run config and a ``state`` that persists across the rounds of
the run, as a SuperNode keeps it) and runs the ClientApp's handler for each message, one after the other.
Messages and replies go through Flower's protobuf serialisation (``serialize=True``), as on the wire,
so a record that would not survive the transport fails here too.

Like the real runtime, an exception raised by the ClientApp becomes an error reply
(``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, reason ``"<class ...>:<'text'>"``) and is logged; the grid
also keeps it in :attr:`LocalGrid.failures`. A node taken offline (:meth:`LocalGrid.disconnect`) is left
out of ``get_node_ids`` and its messages get no reply.

Messages built with ``Message(content, dst_node_id, ...)`` read the process's Flower ``TaskIdentity``,
which the Flower runtime sets in a ServerApp process: use :func:`server_identity` around in-process runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["Exchange", "LocalGrid", "server_identity"]

logger = logging.getLogger(__name__)

ConfigValue = bool | int | float | str


@contextlib.contextmanager
def server_identity(run_id: int = 1, task_id: int = 1) -> Iterator[None]:
    """Set Flower's ``TaskIdentity`` as a ServerApp process has it (node = the SuperLink), restored after."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@dataclass(frozen=True)
class Exchange:
    """One delivered message and its reply (None when the node was offline), as the two sides saw them."""

    request: Message
    reply: Message | None


def _wire(msg: Message) -> Message:
    """``msg`` after a trip through Flower's protobuf serialisation (a new, independent message)."""
    return message_from_proto(message_to_proto(msg))


class LocalGrid(Grid):
    """A Grid running ``client_app`` in this process for every node (see the module docstring).

    Args:
        client_app: the ClientApp, e.g. ``client.app.app``.
        node_configs: node id -> that node's ``node_config`` (what ``flower-supernode --node-config``
            gives), e.g. ``{11: {"site-config": "/path/site.yaml"}}``. Node ids must differ from the
            SuperLink's (1).
        run_config: the run config every node's context carries.
        run_id: the run id of the contexts and of :attr:`run`.
        serialize: send messages and replies through Flower's serialisation (True) or pass the objects.
        keep_history: keep every delivered request and reply in :attr:`history` (memory grows with it).

    Attributes:
        contexts: node id -> its Context (``state`` persists across messages, as on a SuperNode).
        failures: (node id, message type, reason) of every ClientApp exception.
        history: the :class:`Exchange` of every delivered message when ``keep_history``.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Mapping[int, Mapping[str, ConfigValue]],
        run_config: Mapping[str, ConfigValue] | None = None,
        *,
        run_id: int = 1,
        serialize: bool = True,
        keep_history: bool = False,
    ) -> None:
        bad = [n for n in node_configs if isinstance(n, bool) or not isinstance(n, int) or n < 0]
        if bad or SUPERLINK_NODE_ID in node_configs or not node_configs:
            raise ValueError(
                f"node_configs must map at least one node id (int >= 0, not the SuperLink's "
                f"{SUPERLINK_NODE_ID}) to a node config, got node ids {sorted(map(str, node_configs))}"
            )
        self.client_app = client_app
        self.serialize, self.keep_history = serialize, keep_history
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config=dict(config),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node, config in node_configs.items()
        }
        self.offline: set[int] = set()
        self.failures: list[tuple[int, str, str]] = []
        self.history: list[Exchange] = []
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, Message] = {}

    # -- Grid API ----------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue ``messages`` (each gets a message id); they are delivered by :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            if msg.metadata.reply_to_message_id or msg.metadata.ttl <= 0:
                raise ValueError(f"not an instruction message (a reply, or ttl <= 0): {msg.metadata}")
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(
                    f"dst_node_id {msg.metadata.dst_node_id} is not a node of this grid "
                    f"({sorted(self.contexts)})"
                )
            message_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id  # as the SuperLink does on push
            self._pending[message_id] = msg
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Deliver the queued messages ``message_ids`` now, in order; the replies of the online nodes."""
        replies = []
        for message_id in message_ids:
            msg = self._pending.pop(message_id, None)
            if msg is None:
                continue
            reply = self._deliver(msg)
            if reply is not None:
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver ``messages`` and return the replies (synchronous: ``timeout`` is not needed)."""
        return self.pull_messages(list(self.push_messages(messages)))

    # -- delivery ----------------------------------------------------------------------------------
    def disconnect(self, node_id: int) -> None:
        """Take ``node_id`` offline: no longer listed, its messages are lost (no reply)."""
        self.offline.add(node_id)

    def connect(self, node_id: int) -> None:
        self.offline.discard(node_id)

    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node in self.offline:
            logger.info("node %d is offline: %s message lost", node, msg.metadata.message_type)
            self._remember(msg, None)
            return None
        received = _wire(msg) if self.serialize else msg
        received.metadata.delivered_at = str(time.time())
        try:
            reply = self.client_app(received, self.contexts[node])
        except Exception as exc:  # the runtime turns any ClientApp exception into an error reply
            reason = f"{type(exc)}:<'{exc}'>"
            logger.exception("node %d: the ClientApp raised on a %s message", node, msg.metadata.message_type)
            self.failures.append((node, msg.metadata.message_type, reason))
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=received)
        reply = _wire(reply) if self.serialize else reply
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        self._remember(received, reply)
        return reply

    def _remember(self, request: Message, reply: Message | None) -> None:
        if self.keep_history:
            self.history.append(Exchange(request, reply))
