// Byte-level BPE's hot loop for corpora larger than memory: splitting text into the pre-tokenizer's
// pieces and looking each piece's token ids up in a table. Compiled once (not per instruction set):
// it is byte-at-a-time code that no vector unit changes. Python (lmlab/token_shards.py) owns the
// BPE itself: it encodes each piece the table does not hold yet and adds it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lmlab {

// What GPT-2's pre-tokenizer pattern calls an ASCII character:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
enum class CharClass : std::uint8_t { other = 0, letter = 1, digit = 2, space = 3 };

// A byte range of the text: one piece.
struct Span {
    std::size_t start;
    std::size_t length;
};

// The pieces of ASCII text (every byte < 0x80) under the pattern above, in order, exactly as a
// regex engine's leftmost-first matching gives them; `classes` holds each ASCII byte's class.
void split_ascii_pieces(const char* text, std::size_t n, const CharClass classes[128],
                        std::vector<Span>& pieces);

// Piece (its bytes) -> its token ids, an open-addressing hash table that only grows; clear() empties it.
class PieceTable {
public:
    explicit PieceTable(const CharClass classes[128]);

    // The ids of text's pieces, in order, appended to `ids`, and true; or, where some pieces are
    // not in the table, false with each distinct missing piece once in `missing` (ids unchanged).
    // `lengths` null: text is ASCII and is split here; else text is the pieces' bytes back to back
    // and lengths[i] is piece i's byte length (n_lengths of them, summing to n).
    bool encode(const char* text, std::size_t n, const std::int64_t* lengths, std::size_t n_lengths,
                std::vector<std::int32_t>& ids, std::vector<Span>& missing) const;

    // Adds a piece with its ids (a piece already present keeps its first ids).
    void add(const char* piece, std::size_t n, const std::int32_t* piece_ids, std::size_t n_ids);

    std::size_t size() const { return count_; }
    void clear();

private:
    struct Slot {
        std::uint64_t hash = 0;
        std::uint64_t key_offset = 0;  // into keys_
        std::uint32_t key_length = 0;
        std::uint32_t id_count = 0;    // 0: an empty slot (every piece has at least one id)
        std::uint64_t id_offset = 0;   // into ids_
    };

    const Slot* find(const char* piece, std::size_t n, std::uint64_t hash) const;
    void grow();

    CharClass classes_[128];
    std::vector<Slot> slots_;
    std::string keys_;
    std::vector<std::int32_t> ids_;
    std::size_t count_ = 0;
};

}  // namespace lmlab
