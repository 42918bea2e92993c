# Reading the text a user gives (a file, a pipe, stdin) in bounded pieces: a line at a time, each line at most
# a given length, so that /dev/zero or a file with no newline is refused in one line instead of filling memory;
# a pipe nothing writes into yet (a FIFO with no writer) is waited for saying so, instead of hanging silently;
# and a long text tokenized piece by piece into the ids it has as a whole.
import io
import os
import select
import stat
import sys
from typing import Iterable, Iterator, Optional

from errors import UserError

NOTHING_YET_S = 0.2  # how long a pipe may stay silent before we say what we wait for
PIECE_CHARS = 1 << 16  # a long text is tokenized this many characters at a time


def open_text(path, flag: str, what: str, newline: Optional[str] = "\n") -> io.TextIOWrapper:
    """path opened as UTF-8 text for text_lines (newline: how lines end, as open() takes it; by default at \\n
    only, a \\r kept). A regular file, a device, or a pipe (`--text <(...)`, a FIFO); a pipe with nothing to
    read yet is waited for, after one line on stderr saying so (Ctrl-C stops the wait). what: the input the
    flag wants, for the error lines."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open returns at once, writer or not
    except FileNotFoundError:
        raise UserError(f"{flag} {path} not found; give {what}") from None
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be read ({e.strerror or e}); give {what}") from None
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise UserError(f"{flag} {path} is a folder; give {what}")
    if stat.S_ISFIFO(mode):
        wait_for_input(fd, f"{flag} {path}")
    os.set_blocking(fd, True)
    return open(fd, encoding="utf-8", newline=newline)


def wait_for_input(fd: int, name: str):
    """Returns once the pipe fd has something to read or its writer has gone (then reading finds the end).
    Linux reports neither while no writer has opened a FIFO, so a FIFO nobody writes into waits here, said."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(NOTHING_YET_S * 1000):
        print(f"note: {name} is a pipe with nothing in it yet: waiting for a program to write into it "
              f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
        poller.poll()


def text_lines(stream: io.TextIOBase, name: str, limit: int, too_long: str, keep_ends: bool = False) -> Iterator[tuple]:
    """(line number, line without its newline, or with it given keep_ends) of each line of stream, reading at most limit + 1 characters
    at a time: a longer line is a UserError naming it, before it is held whole (too_long: why lines are
    bounded, and what to do). Text that is not UTF-8 is a UserError naming about where it is."""
    number = 0
    while True:
        number += 1
        try:
            line = stream.readline(limit + 1)
        except UnicodeDecodeError:  # the decoder reads ahead: the fault is in this line or one of the next few
            raise UserError(f"{name} is not UTF-8 text (at or just after line {number}); give it in UTF-8") from None
        except OSError as e:
            raise UserError(f"{name} could not be read at line {number} ({e.strerror or e})") from None
        if not line:
            return
        if not line.endswith("\n") and len(line) > limit:
            raise UserError(f"line {number} of {name} is longer than {limit} characters: {too_long}")
        yield number, line if keep_ends or not line.endswith("\n") else line[:-1]


def text_pieces(lines: Iterable[tuple]) -> Iterator[str]:
    """The text of text_lines(..., keep_ends=True) in pieces of about PIECE_CHARS characters, cut only before a
    newline: the first piece as the text starts, each later one from the newline that ends the one before (the
    pieces put together are the text). At least one piece, empty for an empty text."""
    piece, size = [], 0
    for _, line in lines:
        piece.append(line)
        size += len(line)
        if size >= PIECE_CHARS and line.endswith("\n"):
            yield "".join(piece)[:-1]
            piece, size = ["\n"], 1
    yield "".join(piece)


def token_ids(tokenizer, pieces: Iterable[str]) -> Iterator[list]:
    """The ids of text_pieces' pieces, each later piece tokenized as the text continued: the ids of the whole
    text tokenized at once, since SentencePiece pieces do not span a newline."""
    for n, piece in enumerate(pieces):
        yield tokenizer.encode(piece) if n == 0 else continued(tokenizer, piece)


def max_characters(tokenizer, tokens: int) -> int:
    """The most characters `tokens` tokens can spell: no token's text is longer than its piece (a byte
    piece such as <0x0A> spells one character, '▁' one space). Any longer text has more tokens."""
    return tokens * max(len(tokenizer.id_to_piece(i)) for i in range(tokenizer.vocab_size()))


def continued(tokenizer, text: str) -> list:
    """The tokens of text where it continues a text rather than starts one: SentencePiece marks the start of
    a text with a space piece ('\\nHi' is '▁', '\\n', 'Hi'), which mid-text it does not have ('\\n', 'Hi')."""
    ids = tokenizer.encode(text)
    return ids[1:] if ids[:1] == [tokenizer.piece_to_id("\u2581")] else ids
