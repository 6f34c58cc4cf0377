"""Reads TensorBoard event files back for the tests, independently of the
writer: TFRecord framing with CRC32C (Castagnoli) checks, then tensorboardX's
protobuf classes."""

import io
import os
import struct

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2


def _crc_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc_table()


def crc32c(data):
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data):
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
  """Yields each record's bytes, checking both CRCs of every record."""
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', data[pos + 8:pos + 12])
    assert header_crc == masked_crc(header)
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[pos + 12 + length:
                                              pos + 16 + length])
    assert len(payload) == length and payload_crc == masked_crc(payload)
    yield payload
    pos += 16 + length


def read_events(logdir):
  """All events of the event files in `logdir`, file by file, in order."""
  names = sorted(n for n in os.listdir(logdir)
                 if n.startswith('events.out.tfevents.'))
  assert names, f'no event file in {logdir}: {os.listdir(logdir)}'
  return [event_pb2.Event.FromString(r) for name in names
          for r in read_records(os.path.join(logdir, name))]


def scalars_by_tag(events):
  """{tag: {step: value}} of every scalar summary."""
  out = {}
  for e in events:
    for v in e.summary.value:
      if v.HasField('simple_value'):
        out.setdefault(v.tag, {})[e.step] = v.simple_value
  return out


def images_by_tag(events):
  """{tag: {step: (H, W, C) uint8}} of every image summary."""
  out = {}
  for e in events:
    for v in e.summary.value:
      if v.HasField('image'):
        out.setdefault(v.tag, {})[e.step] = decode_png(v.image)
  return out


def decode_png(image_proto):
  return np.asarray(Image.open(io.BytesIO(image_proto.encoded_image_string)))


