"""A minimal OTLP/gRPC trace receiver for the trace tests: another language and another gRPC stack than the
exporters it checks.

    python otlp_receiver.py SPANS.jsonl

Listens on a free port of 127.0.0.1, prints "listening PORT" on stdout once it serves, and appends one JSON
object per received span to SPANS.jsonl (flushed at each export): service, instance (service.instance.id), name, kind, trace_id, span_id,
parent_span_id (hex; "" for a root), attributes (as strings) and links. Runs until killed.
"""

import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def value_text(value):
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.out = open(path, "a", encoding="utf-8")
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for resource_spans in request.resource_spans:
            service = ""
            instance = ""
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = value_text(attribute.value)
                elif attribute.key == "service.instance.id":
                    instance = value_text(attribute.value)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(json.dumps({
                        "service": service,
                        "instance": instance,
                        "name": span.name,
                        "kind": KINDS.get(span.kind, str(span.kind)),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "attributes": {a.key: value_text(a.value) for a in span.attributes},
                        "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()} for l in span.links],
                    }))
        with self.lock:
            for line in lines:
                self.out.write(line + "\n")
            self.out.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(sys.argv[1]), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
