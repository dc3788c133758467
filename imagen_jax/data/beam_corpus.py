"""The Apache Beam side of `corpus_shards`: shards -> (key, example), counted.

  shards --Reshuffle--> read each shard (records) --Reshuffle--> convert (decode,
  resize, PNG) --> (key, example) for TFDS' Beam writer (ArrayRecord shards)
                   \\-> counts (read, written, skipped by reason, sides) --> one JSON file

Reading is parallel over shards, converting over records (the Reshuffle spreads
one shard's records over the workers). The per-record rule and the counting are
`corpus_records.convert` and `corpus_records.Tally`, shared with the in-process
preparation, so both write the same examples under the same keys. Progress:
Beam counters `corpus_shards/{shards_read, records_read, written, skipped_*}`
(the runner's UI, e.g. Dataflow's), and a log line per shard read.
"""

from __future__ import annotations

import json
import logging

import apache_beam as beam
from etils import epath

from imagen_jax.data import corpus_records

_NAMESPACE = corpus_records.NAME
_log = logging.getLogger(__name__)


def make_runner(name: str | None):
  """The Beam runner to use for a runner name (None: the DirectRunner).

  'DirectRunner' gives the `FnApiRunner`, the DirectRunner's batch engine, which
  honors `--direct_running_mode` and `--direct_num_workers`: the DirectRunner
  itself first tries the Prism runner, whose binary it downloads at run time,
  and nothing here downloads at run time. Other names go to Beam as they are.
  """
  if name in (None, "DirectRunner"):
    from apache_beam.runners.portability.fn_api_runner import fn_runner  # pylint: disable=g-import-not-at-top

    return fn_runner.FnApiRunner()
  return name


def _read(shard: str, options):
  """Yields (shard, index, record) for every record of a shard."""
  n = 0
  for index, record in corpus_records.read_records(shard, options):
    n += 1
    yield shard, index, record
  beam.metrics.Metrics.counter(_NAMESPACE, "shards_read").inc()
  beam.metrics.Metrics.counter(_NAMESPACE, "records_read").inc(n)
  _log.info("read %d records from %s", n, shard)


def _convert(item, max_resolution) -> corpus_records.Outcome:
  shard, index, record = item
  outcome = corpus_records.convert(shard, index, record, max_resolution)
  name = "written" if outcome[0] == "written" else f"skipped_{outcome[0]}"
  beam.metrics.Metrics.counter(_NAMESPACE, name).inc()
  return outcome


class _TallyFn(beam.CombineFn):
  """Combines outcomes' (status, side) into `Tally.as_dict()`."""

  def create_accumulator(self):
    return corpus_records.Tally()

  def add_input(self, tally, status_side):
    return tally.add(*status_side)

  def merge_accumulators(self, tallies):
    tallies = iter(tallies)
    first = next(tallies)
    for other in tallies:
      first.merge(other)
    return first

  def extract_output(self, tally):
    return tally.as_dict()


def _write_counts(counts, path: str) -> None:
  epath.Path(path).write_text(json.dumps(counts, indent=1))


class PrepareExamples(beam.PTransform):
  """PBegin -> PCollection of (key, {'image': bytes, 'caption': str}).

  Also writes the counts (`Tally.as_dict()`) as JSON to `counts_path`.
  """

  def __init__(self, source: corpus_records.Source, counts_path: str):
    super().__init__()
    self._source, self._counts_path = source, counts_path

  def expand(self, pbegin):
    outcomes = (
      pbegin
      | "Shards" >> beam.Create(list(self._source.shards))
      | "SpreadShards" >> beam.Reshuffle()
      | "Read" >> beam.FlatMap(_read, self._source.options)
      | "SpreadRecords" >> beam.Reshuffle()
      | "Convert" >> beam.Map(_convert, self._source.max_resolution)
    )
    _ = (
      outcomes
      | "StatusSide" >> beam.Map(lambda o: (o[0], o[1]))
      | "Count" >> beam.CombineGlobally(_TallyFn())
      | "WriteCounts" >> beam.Map(_write_counts, self._counts_path)
    )
    return (
      outcomes
      | "Written" >> beam.Filter(lambda o: o[2] is not None)
      | "KeyExample" >> beam.Map(lambda o: (o[2], o[3]))
    )
