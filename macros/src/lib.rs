//! The attributes partner-payouts' code shares.

use proc_macro::{Delimiter, Group, Punct, Spacing, TokenStream, TokenTree};

/// `#[store_span]` on a store method: the method runs in its CLIENT span, named
/// `store.<method>`, with OpenTelemetry's database attributes: the system
/// (`db.system.name = DB_SYSTEM`, the constant of the database the method is compiled for),
/// the operation (`db.operation.name`, the method's name) and the database
/// (`db.namespace = self.db_namespace()`), and none of its arguments. Further fields go in the
/// attribute: `#[store_span(rows = rows.len())]`.
///
/// It stands for the `#[tracing::instrument(...)]` every store method would otherwise spell
/// out, so no store call can be misnamed or lose its kind. Like that attribute, it goes inside
/// `#[async_trait]`, which has already made the method a boxed future when it is applied.
#[proc_macro_attribute]
pub fn store_span(fields: TokenStream, item: TokenStream) -> TokenStream {
    let Some(method) = method_name(item.clone()) else {
        return parse("compile_error!(\"#[store_span] goes on a method\");");
    };
    let mut all_fields = parse(&format!(
        "otel.kind = \"client\", db.system.name = DB_SYSTEM, \
         db.operation.name = \"{method}\", db.namespace = self.db_namespace()"
    ));
    if !fields.is_empty() {
        all_fields.extend([TokenTree::Punct(Punct::new(',', Spacing::Alone))]);
        all_fields.extend(fields);
    }
    let mut arguments = parse(&format!("name = \"store.{method}\", skip_all, fields"));
    arguments.extend([group(Delimiter::Parenthesis, all_fields)]);
    let mut attribute = parse("::tracing::instrument");
    attribute.extend([group(Delimiter::Parenthesis, arguments)]);
    let mut out = TokenStream::from(TokenTree::Punct(Punct::new('#', Spacing::Alone)));
    out.extend([group(Delimiter::Bracket, attribute)]);
    out.extend(item);
    out
}

/// The name of the function `item` declares.
fn method_name(item: TokenStream) -> Option<String> {
    let mut tokens = item.into_iter();
    tokens.find(|t| matches!(t, TokenTree::Ident(i) if i.to_string() == "fn"))?;
    match tokens.next()? {
        TokenTree::Ident(name) => Some(name.to_string()),
        _ => None,
    }
}

/// Tokens of code this macro writes (never the caller's), so they always parse.
fn parse(code: &str) -> TokenStream {
    code.parse().expect("the attribute's own code parses")
}

fn group(delimiter: Delimiter, tokens: TokenStream) -> TokenTree {
    TokenTree::Group(Group::new(delimiter, tokens))
}
