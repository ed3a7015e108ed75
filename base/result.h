// A value or a typed error (std::expected arrives only in C++23).
#pragma once

#include <utility>
#include <variant>

namespace lkvm {

template <typename E>
struct Failure {
    E error;
};
template <typename E>
Failure<E> fail(E e) { return {e}; }

template <typename T, typename E>
class Result {
public:
    Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}
    Result(Failure<E> f) : v_(std::in_place_index<1>, f.error) {}
    bool ok() const { return v_.index() == 0; }
    explicit operator bool() const { return ok(); }
    T& value() { return std::get<0>(v_); }
    const T& value() const { return std::get<0>(v_); }
    T& operator*() { return value(); }
    T* operator->() { return &value(); }
    const T* operator->() const { return &value(); }
    E error() const { return std::get<1>(v_); }

private:
    std::variant<T, E> v_;
};

}  // namespace lkvm
