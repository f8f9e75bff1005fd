// Byte-level BPE's pre-tokenizer split of ASCII text and the piece -> ids table (pieces.h).
#include "pieces.h"

#include <cstring>
#include <string_view>
#include <unordered_set>

namespace lmlab {

namespace {

bool is_contraction(const char* p, std::size_t left) {
    // After the apostrophe at p[0]: s|t|m|d, or re|ve|ll (case-sensitive, as the pattern is).
    if (left < 2) return false;
    char a = p[1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return true;
    if (left < 3) return false;
    char b = p[2];
    return (a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l');
}

std::uint64_t hash_bytes(const char* p, std::size_t n) {
    std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a
    for (std::size_t i = 0; i < n; i++) {
        h ^= static_cast<unsigned char>(p[i]);
        h *= 0x100000001b3ull;
    }
    return h ^ (h >> 29);
}

}  // namespace

void split_ascii_pieces(const char* text, std::size_t n, const CharClass classes[128],
                        std::vector<Span>& pieces) {
    auto cls = [&](std::size_t i) { return classes[static_cast<unsigned char>(text[i]) & 0x7F]; };
    std::size_t i = 0;
    while (i < n) {
        if (text[i] == '\'' && is_contraction(text + i, n - i)) {
            std::size_t len = (text[i + 1] == 's' || text[i + 1] == 't' || text[i + 1] == 'm' ||
                               text[i + 1] == 'd') ? 2 : 3;
            pieces.push_back({i, len});
            i += len;
            continue;
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class.
        std::size_t run_start = i;
        if (text[i] == ' ' && i + 1 < n && cls(i + 1) != CharClass::space) run_start = i + 1;
        CharClass c = cls(run_start);
        std::size_t end = run_start + 1;
        if (c != CharClass::space) {
            while (end < n && cls(end) == c) end++;
            pieces.push_back({i, end - i});
            i = end;
            continue;
        }
        // Whitespace: `\s+(?!\S)` takes the run but its last character when text follows (that
        // one starts the next piece), the whole run at the end; `\s+` takes a lone character.
        while (end < n && cls(end) == CharClass::space) end++;
        std::size_t len = end == n ? end - i : (end - 1 > i ? end - 1 - i : 1);
        pieces.push_back({i, len});
        i += len;
    }
}

PieceTable::PieceTable(const CharClass classes[128]) : slots_(1024) {
    std::memcpy(classes_, classes, sizeof classes_);
}

void PieceTable::clear() {
    slots_.assign(1024, Slot{});
    keys_.clear();
    keys_.shrink_to_fit();
    ids_.clear();
    ids_.shrink_to_fit();
    count_ = 0;
}

const PieceTable::Slot* PieceTable::find(const char* piece, std::size_t n, std::uint64_t hash) const {
    std::size_t mask = slots_.size() - 1;
    for (std::size_t at = hash & mask;; at = (at + 1) & mask) {
        const Slot& s = slots_[at];
        if (s.id_count == 0) return nullptr;
        if (s.hash == hash && s.key_length == n && std::memcmp(keys_.data() + s.key_offset, piece, n) == 0)
            return &s;
    }
}

void PieceTable::grow() {
    std::vector<Slot> old(slots_.size() * 2);
    old.swap(slots_);
    std::size_t mask = slots_.size() - 1;
    for (const Slot& s : old) {
        if (s.id_count == 0) continue;
        std::size_t at = s.hash & mask;
        while (slots_[at].id_count != 0) at = (at + 1) & mask;
        slots_[at] = s;
    }
}

void PieceTable::add(const char* piece, std::size_t n, const std::int32_t* piece_ids, std::size_t n_ids) {
    if (n_ids == 0) return;  // never: BPE gives every non-empty piece at least one id
    std::uint64_t hash = hash_bytes(piece, n);
    if (find(piece, n, hash)) return;
    if (2 * (count_ + 1) > slots_.size()) grow();  // load factor at most one half
    std::size_t mask = slots_.size() - 1;
    std::size_t at = hash & mask;
    while (slots_[at].id_count != 0) at = (at + 1) & mask;
    Slot& s = slots_[at];
    s.hash = hash;
    s.key_offset = keys_.size();
    s.key_length = static_cast<std::uint32_t>(n);
    s.id_offset = ids_.size();
    s.id_count = static_cast<std::uint32_t>(n_ids);
    keys_.append(piece, n);
    ids_.insert(ids_.end(), piece_ids, piece_ids + n_ids);
    count_++;
}

bool PieceTable::encode(const char* text, std::size_t n, const std::int64_t* lengths,
                        std::size_t n_lengths, std::vector<std::int32_t>& ids,
                        std::vector<Span>& missing) const {
    std::vector<Span> pieces;
    if (lengths) {
        pieces.reserve(n_lengths);
        std::size_t at = 0;
        for (std::size_t k = 0; k < n_lengths; k++) {
            pieces.push_back({at, static_cast<std::size_t>(lengths[k])});
            at += static_cast<std::size_t>(lengths[k]);
        }
    } else {
        pieces.reserve(n / 3 + 16);
        split_ascii_pieces(text, n, classes_, pieces);
    }
    std::size_t ids_before = ids.size();
    std::unordered_set<std::string_view> seen;  // the missing pieces listed so far
    for (const Span& p : pieces) {
        const char* piece = text + p.start;
        const Slot* s = find(piece, p.length, hash_bytes(piece, p.length));
        if (s) {
            if (missing.empty()) {
                const std::int32_t* first = ids_.data() + s->id_offset;
                ids.insert(ids.end(), first, first + s->id_count);
            }
        } else if (seen.insert(std::string_view(piece, p.length)).second) {
            missing.push_back(p);
        }
    }
    if (!missing.empty()) ids.resize(ids_before);
    return missing.empty();
}

}  // namespace lmlab
