//! `#[derive(Module)]` for kiln structs whose fields are layers and tensors.
//!
//! The derive writes `kiln::nn::Module` for the struct from its fields: `visit` names every
//! tensor as PyTorch's `state_dict` would (`field`, `field.0.weight`, ...), `set_training`
//! reaches every sub-module, and `describe` reports the type and its parameter count. The
//! struct provides `forward` as an inherent method with the trait's signature.
//!
//! Field kinds, by type:
//! - `Tensor`, `Option<Tensor>`, `Vec<Tensor>`: parameters (`#[module(buffer)]` for saved state
//!   that is not trained);
//! - numbers, `bool`, `String`, `usize` and the like: configuration, not visited;
//! - anything else (`T`, `Option<T>`, `Vec<T>`, `Box<T>`): a sub-module, which must implement
//!   `Module`, so a layer can never be left out of `parameters()` by mistake;
//! - `#[module(skip)]` leaves a field out explicitly.

use proc_macro::TokenStream;
use quote::{format_ident, quote};
use syn::{parse_macro_input, Data, DeriveInput, Fields, GenericArgument, PathArguments, Type};

const PLAIN: &[&str] = &[
    "bool",
    "u8",
    "u16",
    "u32",
    "u64",
    "u128",
    "usize",
    "i8",
    "i16",
    "i32",
    "i64",
    "i128",
    "isize",
    "f32",
    "f64",
    "char",
    "String",
    "Activation",
];

/// What a field holds.
enum Kind {
    Tensor,
    Module,
    /// A `Box` of a module (`Box<dyn Module>` or `Box<T>`), reached through a deref.
    BoxedModule,
    Plain,
}

/// The outer wrapper of a field's type.
enum Shape {
    One,
    Option,
    Vec,
}

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(p) => p.path.segments.last(),
        _ => None,
    }
}

fn inner(seg: &syn::PathSegment) -> Option<&Type> {
    match &seg.arguments {
        PathArguments::AngleBracketed(a) => a.args.iter().find_map(|g| match g {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        }),
        _ => None,
    }
}

fn classify(ty: &Type) -> (Shape, Kind) {
    let Some(seg) = last_segment(ty) else {
        return (Shape::One, Kind::Plain);
    };
    let name = seg.ident.to_string();
    let (shape, ty) = match name.as_str() {
        "Option" => (Shape::Option, inner(seg).unwrap_or(ty)),
        "Vec" => (Shape::Vec, inner(seg).unwrap_or(ty)),
        _ => (Shape::One, ty),
    };
    let Some(seg) = last_segment(ty) else {
        return (shape, Kind::Plain);
    };
    let name = seg.ident.to_string();
    let kind = if name == "Tensor" {
        Kind::Tensor
    } else if name == "Box" {
        Kind::BoxedModule
    } else if PLAIN.contains(&name.as_str()) {
        Kind::Plain
    } else {
        Kind::Module
    };
    (shape, kind)
}

/// Derives `kiln::nn::Module` from a struct's fields; see the crate documentation.
#[proc_macro_derive(Module, attributes(module))]
pub fn derive_module(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let fields = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(f) => f.named.iter().collect::<Vec<_>>(),
            _ => {
                return syn::Error::new_spanned(name, "derive(Module) needs named fields")
                    .to_compile_error()
                    .into()
            }
        },
        _ => {
            return syn::Error::new_spanned(name, "derive(Module) works on structs")
                .to_compile_error()
                .into()
        }
    };
    let mut visits = Vec::new();
    let mut modes = Vec::new();
    for f in fields {
        let ident = f.ident.as_ref().expect("named field");
        let key = ident.to_string();
        let mut skip = false;
        let mut buffer = false;
        for attr in f.attrs.iter().filter(|a| a.path().is_ident("module")) {
            let parsed = attr.parse_nested_meta(|m| {
                if m.path.is_ident("skip") {
                    skip = true;
                } else if m.path.is_ident("buffer") {
                    buffer = true;
                } else {
                    return Err(m.error("expected `skip` or `buffer`"));
                }
                Ok(())
            });
            if let Err(e) = parsed {
                return e.to_compile_error().into();
            }
        }
        if skip {
            continue;
        }
        let role = if buffer {
            quote!(::kiln::nn::TensorRole::Buffer)
        } else {
            quote!(::kiln::nn::TensorRole::Parameter)
        };
        let (shape, kind) = classify(&f.ty);
        let child = format_ident!("child");
        let visit_module = |value: proc_macro2::TokenStream, prefix: proc_macro2::TokenStream| {
            quote! {
                {
                    let #child: &dyn ::kiln::nn::Module = #value;
                    let prefix = #prefix;
                    #child.visit(&mut |n, t, r| f(&format!("{}.{}", prefix, n), t, r));
                }
            }
        };
        let boxed = matches!(kind, Kind::BoxedModule);
        let kind = if boxed { Kind::Module } else { kind };
        // A boxed module is reached through one more deref.
        let r = |v: proc_macro2::TokenStream| if boxed { quote!(&**#v) } else { v };
        let rm = |v: proc_macro2::TokenStream| if boxed { quote!(&mut **#v) } else { v };
        match (shape, kind) {
            (_, Kind::Plain | Kind::BoxedModule) => {}
            (Shape::One, Kind::Tensor) => visits.push(quote!(f(#key, &self.#ident, #role);)),
            (Shape::Option, Kind::Tensor) => visits.push(quote! {
                if let Some(t) = &self.#ident { f(#key, t, #role); }
            }),
            (Shape::Vec, Kind::Tensor) => visits.push(quote! {
                for (i, t) in self.#ident.iter().enumerate() { f(&format!("{}.{}", #key, i), t, #role); }
            }),
            (Shape::One, Kind::Module) => {
                let (v, vm) = (r(quote!((&self.#ident))), rm(quote!((&mut self.#ident))));
                visits.push(visit_module(v, quote!(#key)));
                modes.push(quote!(::kiln::nn::Module::set_training(#vm, training);));
            }
            (Shape::Option, Kind::Module) => {
                let v = visit_module(r(quote!(m)), quote!(#key));
                let vm = rm(quote!(m));
                visits.push(quote!(if let Some(m) = &self.#ident { #v }));
                modes.push(quote! {
                    if let Some(m) = &mut self.#ident { ::kiln::nn::Module::set_training(#vm, training); }
                });
            }
            (Shape::Vec, Kind::Module) => {
                let v = visit_module(r(quote!(m)), quote!(format!("{}.{}", #key, i)));
                let vm = rm(quote!(m));
                visits.push(quote!(for (i, m) in self.#ident.iter().enumerate() { #v }));
                modes.push(quote! {
                    for m in &mut self.#ident { ::kiln::nn::Module::set_training(#vm, training); }
                });
            }
        }
    }
    let type_name = name.to_string();
    quote! {
        impl #impl_generics ::kiln::nn::Module for #name #ty_generics #where_clause {
            fn forward(&self, x: &::kiln::Tensor) -> ::kiln::Result<::kiln::Tensor> {
                #name::forward(self, x)
            }

            fn visit(&self, f: &mut dyn FnMut(&str, &::kiln::Tensor, ::kiln::nn::TensorRole)) {
                #(#visits)*
            }

            fn set_training(&mut self, training: bool) {
                let _ = training;
                #(#modes)*
            }

            fn describe(&self) -> String {
                format!("{}({} parameters)", #type_name, ::kiln::nn::Module::parameter_count(self))
            }
        }
    }
    .into()
}
