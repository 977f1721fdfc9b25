"""mamba_jax.data.dna: FASTA/GenBank parsing, tokens, the split by assembly, window sampling.

The real packages (``kleborate-examples``, ``kaptive-data``) are fetched with
``apt-get download`` in one slow test; without apt-get it skips with the reason,
except under CI, where that is a failure.
"""

import gzip
import lzma
import os
import shutil

import numpy as np
import pytest

from mamba_jax.data import dna


def _write_fasta(path, records, compress=None):
    text = "".join(f">{h} some description\n" + "\n".join(s[i : i + 7] for i in range(0, len(s), 7)) + "\n"
                   for h, s in records).encode()
    if compress == "gz":
        text = gzip.compress(text)
    elif compress == "xz":
        text = lzma.compress(text)
    path.write_bytes(text)
    return path


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)

    def seq(n):
        return "".join(rng.choice(list("ACGT"), n))

    a = _write_fasta(tmp_path / "genomeA.fna", [("chrA", seq(300)), ("plasA", seq(40))])
    b = _write_fasta(tmp_path / "genomeB.fna.gz", [("chrB", seq(200))], compress="gz")
    c = _write_fasta(tmp_path / "genomeC.fna.xz", [("chrC", seq(250) + "ryNn")], compress="xz")
    return dna.DnaCorpus.from_files([a, b, c], held_out="genomeC")


def test_encode_maps_iupac_to_n_and_counts():
    tokens, ambiguous = dna.encode("ACGTNacgtnRYk 12\n")
    assert dna.decode(tokens) == "ACGTNACGTNNNN"
    assert ambiguous == 3
    with pytest.raises(ValueError, match="not a nucleotide"):
        dna.encode("ACGU")


def test_parse_fasta_plain_gz_xz(corpus):
    assert corpus.train_names == ("genomeA/chrA", "genomeA/plasA", "genomeB/chrB")
    assert corpus.held_out_names == ("genomeC/chrC",)
    assert [r.size for r in corpus.train] == [300, 40, 200]
    assert dna.decode(corpus.held_out[0][-4:]) == "NNNN"
    assert [s["ambiguous_to_n"] for s in corpus.sources] == [0, 0, 2]
    assert corpus.describe()["held_out_bases"] == 254


def test_read_genbank(tmp_path):
    path = tmp_path / "loci.gbk"
    path.write_text("LOCUS       KL1   12 bp    DNA\nFEATURES\nORIGIN      \n        1 acgtacgtac\n"
                    "       11 gt\n//\nLOCUS       KL2   3 bp\nORIGIN\n        1 ttt\n//\n")
    records = [(name, dna.decode(dna.encode(s)[0])) for name, s in dna.read_genbank(path)]
    assert records == [("KL1", "ACGTACGTACGT"), ("KL2", "TTT")]


def test_windows_stay_in_training_records_and_are_deterministic(corpus):
    batch = corpus.sample_batch(np.random.default_rng([0, 5]), 64, 50)
    again = corpus.sample_batch(np.random.default_rng([0, 5]), 64, 50)
    np.testing.assert_array_equal(batch["inputs"], again["inputs"])
    assert batch["inputs"].shape == batch["targets"].shape == (64, 50)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    train = ["".join(dna.decode(r)) for r in corpus.train]
    held = dna.decode(corpus.held_out[0])
    for inp, tgt in zip(batch["inputs"], batch["targets"]):
        window = dna.decode(np.concatenate([inp, tgt[-1:]]))
        assert any(window in t for t in train[:1] + train[2:])  # the 40-base plasmid is too short for 51
        assert window not in held
    with pytest.raises(ValueError, match="longer than every train record"):
        corpus.sample_batch(np.random.default_rng(0), 1, 300)


def test_held_out_assembly_never_in_training(corpus):
    assert not set(corpus.train_names) & set(corpus.held_out_names)
    with pytest.raises(ValueError, match="not one of the assemblies"):
        dna.DnaCorpus.from_files([], held_out="genomeC")


def test_eval_batches_cover_the_same_prefix(corpus):
    for seq_len, batch in ((10, 4), (40, 1), (20, 2)):
        batches = corpus.eval_batches(seq_len, batch, num_targets=80)
        targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
        np.testing.assert_array_equal(targets, corpus.held_out[0][1:81])
    with pytest.raises(ValueError, match="multiple"):
        corpus.eval_batches(30, 1, num_targets=80)


def test_fetch_failure_names_package_and_command(tmp_path, monkeypatch):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not on PATH: the download error path needs it")
    with pytest.raises(RuntimeError, match=r"no-such-package-mamba-jax.*apt-get download"):
        dna.fetch_packages(tmp_path, ("no-such-package-mamba-jax",))


@pytest.mark.slow
def test_real_packages_load(tmp_path_factory):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        reason = "apt-get/dpkg-deb not on PATH: the Debian DNA packages cannot be fetched"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    corpus = dna.DnaCorpus.from_packages(include_kaptive=True)
    names = {n.split("/")[0] for n in corpus.train_names}
    assert {"Klebs_HS11286", "Klebs_Kp1084", "MGH78578"} <= names
    assert corpus.held_out_names[0].startswith(dna.DEFAULT_HELD_OUT)
    assert max(r.size for r in corpus.held_out) > 5_000_000  # a whole chromosome: 2^22-base contexts fit
    assert corpus.describe()["train_bases"] > 25_000_000  # three genomes plus ~11 M bases of loci
    print(f"\nMEASURED: {corpus.describe()['train_bases']:,} train bases, {len(corpus.train)} records")
