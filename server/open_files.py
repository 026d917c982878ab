"""The process's open-files limit: raised at start, and what it leaves for shared memory regions.

Every registered system shared memory region keeps its object's descriptor open (it is read and
written through it, ``server/shared_memory.py``). Under the usual soft limit of 1,024 a client
registering regions would use up the descriptors that sockets, model files, image decoding and
the metrics endpoint need, and those would then fail in ways that say nothing of the cause
("not a decodable image", a metrics scrape that times out, "Too many open files" on a model
load). So the soft limit is raised to the hard one at start, and regions get only what is left
after a reserve for everything else: past that, registering answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The soft limit is raised no further than this, even under a larger (or unlimited) hard limit:
# enough for any load this server takes, and child programs that close every descriptor up to
# the limit stay quick.
SOFT_LIMIT_TARGET = 65_536
# Descriptors kept out of the regions' reach: client connections, the epoll and eventfds of gRPC
# and onnxruntime threads, model and tokenizer files being read, the metrics server's sockets.
# A quarter of the limit, and never fewer than this many.
MIN_RESERVED_DESCRIPTORS = 256
# The most regions a server holds however high the limit (Triton has no cap; a client that keeps
# registering is misbehaving long before this).
MAX_REGIONS = 1024


@dataclass(frozen=True)
class OpenFilesLimit:
    """The soft and hard RLIMIT_NOFILE after ``raise_soft_limit``; ``was``: the soft one before."""

    soft: int
    hard: int
    was: int


def raise_soft_limit(target: int = SOFT_LIMIT_TARGET) -> OpenFilesLimit:
    """Raises the soft open-files limit toward the hard one (at most ``target``) and logs the result.

    A limit that cannot be raised (a platform that refuses) is kept as it is, with a warning.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(hard, target)
    was = soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as err:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, wanted, err)
    limit = OpenFilesLimit(soft=_finite(soft), hard=_finite(hard), was=_finite(was))
    if limit.soft != limit.was:
        log.info("open-files limit raised from %d to %d (hard limit %d)", limit.was, limit.soft, limit.hard)
    else:
        log.info("open-files limit %d (hard limit %d)", limit.soft, limit.hard)
    return limit


def region_capacity(soft_limit: int) -> int:
    """How many shared memory regions may be registered under ``soft_limit`` open files: what is
    left after the reserve for everything else, at most ``MAX_REGIONS`` (0: none)."""
    reserved = max(MIN_RESERVED_DESCRIPTORS, soft_limit // 4)
    return max(0, min(MAX_REGIONS, soft_limit - reserved))


def _finite(limit: int) -> int:
    # An unlimited limit (RLIM_INFINITY) as a number that compares and logs as one.
    return 2**31 - 1 if limit == resource.RLIM_INFINITY else limit
