"""The part of Triton's ``model_config.proto`` that our ``config.pbtxt`` files use, built at run time.

Names, types and enum values follow Triton's proto (``inference.ModelConfig``); field numbers are Triton's
too. Parsing a written ``config.pbtxt`` with :func:`parse_model_config` runs protobuf's own text-format
parser against this schema, so a misspelt field, a wrong type or an unknown enum value fails the parse.
"""

from __future__ import annotations

from functools import lru_cache

DATA_TYPES = ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16",
              "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]


@lru_cache(maxsize=1)
def model_config_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="triton_model_config_subset.proto", package="inference", syntax="proto3")
    enum = fdp.enum_type.add(name="DataType")
    for i, n in enumerate(DATA_TYPES):
        enum.value.add(name=n, number=i)

    def msg(name, fields, nested_enums=()):
        m = fdp.message_type.add(name=name)
        for ename, values in nested_enums:
            e = m.enum_type.add(name=ename)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("ModelTensorReshape", [("shape", 1, F.TYPE_INT64, rep, None)])
    msg("ModelInput", [("name", 1, F.TYPE_STRING, opt, None), ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType"),
                       ("dims", 4, F.TYPE_INT64, rep, None), ("reshape", 5, F.TYPE_MESSAGE, opt, ".inference.ModelTensorReshape")])
    msg("ModelOutput", [("name", 1, F.TYPE_STRING, opt, None), ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType"),
                        ("dims", 3, F.TYPE_INT64, rep, None), ("reshape", 5, F.TYPE_MESSAGE, opt, ".inference.ModelTensorReshape")])
    msg("ModelDynamicBatching", [("preferred_batch_size", 1, F.TYPE_INT32, rep, None), ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, opt, None)])
    msg("ModelInstanceGroup", [("name", 1, F.TYPE_STRING, opt, None), ("count", 2, F.TYPE_INT32, opt, None), ("gpus", 3, F.TYPE_INT32, rep, None),
                               ("kind", 4, F.TYPE_ENUM, opt, ".inference.ModelInstanceGroup.Kind")],
        nested_enums=[("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])])
    msg("ModelConfig", [("name", 1, F.TYPE_STRING, opt, None), ("platform", 2, F.TYPE_STRING, opt, None), ("max_batch_size", 4, F.TYPE_INT32, opt, None),
                        ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"), ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
                        ("instance_group", 7, F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
                        ("dynamic_batching", 11, F.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching"), ("backend", 17, F.TYPE_STRING, opt, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_model_config(text: str):
    """Parse ``config.pbtxt`` text into a ``ModelConfig`` message (raises ``text_format.ParseError``)."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_class()())


def type_name(value: int) -> str:
    return DATA_TYPES[value]
