"""`grpc.reflection.v1`, the standard reflection service, for servers and clients of this package.

grpcio-reflection ships only `grpc.reflection.v1alpha`, while current clients (grpcurl, Postman, grpcui)
ask for `v1` first. The two protocols are the same messages with the same field numbers under another
package name (v1 is v1alpha promoted), so `v1` is derived here from the installed v1alpha descriptor,
with the package, the file name and the type references renamed, and added to protobuf's default pool:
reflection can then describe itself under both names, and a client gets real `v1` message classes.
Because the bytes on the wire are identical, a server answers `v1` calls with grpcio-reflection's own
servicer (`add_to_server`); nothing of the protocol is reimplemented.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as _alpha

PACKAGE = "grpc.reflection.v1"
FILE_NAME = "grpc/reflection/v1/reflection.proto"  # its path in the grpc/grpc-proto repository
SERVICE_NAME = f"{PACKAGE}.ServerReflection"
METHOD = f"/{SERVICE_NAME}/ServerReflectionInfo"


def _derived() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    _alpha.DESCRIPTOR.CopyToProto(fdp)
    old = "." + fdp.package + "."
    fdp.name, fdp.package = FILE_NAME, PACKAGE
    fdp.options.Clear()
    fdp.options.java_package = "io.grpc.reflection.v1"
    fdp.options.java_outer_classname = "ServerReflectionProto"
    fdp.options.java_multiple_files = True
    fdp.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for m in fdp.message_type:
        for f in m.field:
            if f.type_name.startswith(old):
                f.type_name = f".{PACKAGE}." + f.type_name[len(old):]
    for s in fdp.service:
        for meth in s.method:
            meth.input_type = f".{PACKAGE}." + meth.input_type[len(old):]
            meth.output_type = f".{PACKAGE}." + meth.output_type[len(old):]
    return fdp


def _file():
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(FILE_NAME)  # added already (by this module, or by generated code of it)
    except KeyError:
        return pool.Add(_derived())


DESCRIPTOR = _file()
ServerReflectionRequest = message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name["ServerReflectionRequest"])
ServerReflectionResponse = message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name["ServerReflectionResponse"])


def add_to_server(servicer, server) -> None:
    """Serves `servicer` (grpcio-reflection's v1alpha servicer, sync or asyncio) as `grpc.reflection.v1` too."""
    import grpc

    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=_alpha.ServerReflectionRequest.FromString,  # the same bytes as v1's
        response_serializer=_alpha.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )


def stub(channel):
    """A client's `ServerReflectionInfo` call of `grpc.reflection.v1` (a stream of requests -> responses)."""
    return channel.stream_stream(
        METHOD,
        request_serializer=ServerReflectionRequest.SerializeToString,
        response_deserializer=ServerReflectionResponse.FromString,
    )
